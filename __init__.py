"""swiftstep: one-step diffusion, negative-prompt attention, step annealing and one-step SR for diffusers and ComfyUI.

Importing the package imports neither diffusers nor ComfyUI; ``swiftstep.pipelines`` pulls in diffusers on use.
"""

__version__ = "0.1.0"
