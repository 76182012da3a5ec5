"""How brainmoe runs on clusters: the `brainmoe` command and Ray/KubeRay/Slurm wiring.

Holds no model or data logic: it only connects the layers' entry points to engines.
"""
