"""A runtime for UI-TARS-style GUI agents (UI-TARS: "Pioneering Automated GUI Interaction with Native Agents",
arXiv 2501.12326): parse model answers into typed actions, map coordinates to the screen, talk to an
OpenAI-compatible server, check each step against a policy, execute on headless Chromium or X11, and evaluate
grounding.

No torch here: the agent runs next to a model served elsewhere.
"""

from flashtune.agent.actions import Action, Coord, Step
from flashtune.agent.client import ChatClient, EndpointError, Sampling
from flashtune.agent.coords import CoordinateMapper, smart_resize
from flashtune.agent.loop import AgentConfig, run_agent
from flashtune.agent.parser import ActionParseError, parse_action, parse_response
from flashtune.agent.policy import Policy, PolicyError
from flashtune.agent.prompts import build_messages

__all__ = ["Action", "Coord", "Step", "parse_response", "parse_action", "ActionParseError", "smart_resize",
           "CoordinateMapper", "build_messages", "ChatClient", "Sampling", "EndpointError", "AgentConfig",
           "run_agent", "Policy", "PolicyError"]
