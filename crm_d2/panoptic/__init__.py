"""Panoptic and entity post-refinement: COCO panoptic I/O, PQ and mask-AP evaluation, refinement and merging.

Submodules are imported where used (`crm_d2.panoptic.coco`, `.pq`, `.instances_eval`, `.refine`, `.merge`) so that
evaluating never pulls in torch.
"""
