"""Training CRM: coarse-mask synthesis, datasets, losses, the trainer and synthetic scenes.

Only `crm-d2 train` and the tests need this package; inference never imports it.
"""
