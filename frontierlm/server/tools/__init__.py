"""Tool calling for /v1/chat/completions: request fields (protocol), call formats by vLLM parser name
(parsers), the grammar and mode of a request (plan), and streamed deltas (streaming)."""
from frontierlm.server.tools.parsers import PARSERS, detect_parser, get_parser
from frontierlm.server.tools.plan import ToolPlan, plan_tools
from frontierlm.server.tools.streaming import ToolStreamer, prepare_resume

__all__ = ["PARSERS", "ToolPlan", "ToolStreamer", "detect_parser", "get_parser", "plan_tools", "prepare_resume"]
