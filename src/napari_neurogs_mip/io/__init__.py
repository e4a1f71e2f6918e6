"""Files in and out: checkpoints, TIFF volumes and MIPs, SWC skeletons."""
