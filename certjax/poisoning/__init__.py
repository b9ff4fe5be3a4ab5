"""Data poisoning and backdoors: poison generators and the defences that find or remove poison.

Pure functions over arrays, `logits_fn`s and parameter pytrees, like every
algorithm package: the training loop applies a recorded poison to the data
pipeline, the 'backdoor' evaluators score attacks and defences.
"""
