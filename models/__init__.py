"""Networks (models.networks) and GAN recipes (models.recipes): what is trained, never where."""
