"""Networks (gannet.models.networks) and GAN recipes (gannet.models.recipes): what is trained, never where."""
