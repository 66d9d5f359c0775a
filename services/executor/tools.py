"""The plug-in API, at its long-standing import path: ``from services.executor.tools import tool``.

    from services.executor.tools import Call, tool

    @tool("crm.tag_customer")
    def tag_customer(inputs: dict, call: Call) -> dict:
        ...  # pass call.idempotency_key (the same for every attempt) to the third party

The registry and the toolbox live in ``services.executor.adapters.toolbox``."""

from services.executor.adapters.toolbox import Call, Toolbox, ToolFn, ToolResult, tool

__all__ = ["Call", "ToolFn", "ToolResult", "Toolbox", "tool"]
