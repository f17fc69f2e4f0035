"""maskfer: stage 2 of CAFE, the sigmoid-mask CNN trained against cached frozen features."""
