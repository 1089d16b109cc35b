"""Training: the progressive trainer and the mechanisms its loop calls (losses, warp, LRD, EMA, GAN)."""
