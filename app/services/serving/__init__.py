"""Inference: versions resolved and cached in tiers, the engine started, one generation path for every
route, event stream slots."""
