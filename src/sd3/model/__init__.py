from sd3.model.mmdit import MMDiT

__all__ = ["MMDiT"]
