"""Scoring sentences with a pretrained model: the PLL scorer, the score and rescore commands."""
