"""ComfyUI adapters (V3 schema). Imported by ComfyUI through the root `comfy_entrypoint`, never by `import swiftstep`."""

from comfy_api.latest import ComfyExtension, io

from . import attention_nodes, fast_path_nodes, mar_nodes, nasa_nodes, one_step_nodes, sana_sprint_nodes, sr_nodes

NODE_MODULES = [one_step_nodes, nasa_nodes, attention_nodes, fast_path_nodes, sr_nodes, mar_nodes, sana_sprint_nodes]


class SwiftStepExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for module in NODE_MODULES for node in module.NODES]
