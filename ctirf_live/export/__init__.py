"""Share models the field's way: bioimage.io model packages (`ctirf export`)."""
