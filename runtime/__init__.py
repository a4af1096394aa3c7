"""What both model families share: layers, safetensors I/O, HF weight mapping and the model interface.

ssm/ and transformer/ import from here and never from each other; experiments/ builds on all three.
"""
