"""The foundation every stage stands on: errors, the validated config, the process group, layer names.

Imports nothing else of evapipe; everything else may import it.
"""
