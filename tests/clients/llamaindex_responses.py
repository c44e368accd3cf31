"""LlamaIndex's `OpenAIResponses` against ORP (run by tests/test_agent_clients.py in its own
virtualenv): a chat, a streamed chat, a tool call, and the answer after the tool's output.

Prints one JSON object of what the client saw. LlamaIndex insists on OpenAI model names (for
their context windows), so the test maps `gpt-4.1` to the mock's echo model `mock` and
`gpt-4.1-mini` to `mock-tools` (which calls the first declared tool with {"city": "Paris"}).
"""

import json
import sys

from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai import OpenAIResponses


def get_weather(city: str) -> str:
    """Get the weather for a city."""
    return f"sunny in {city}"


def main(base_url: str) -> None:
    echo = OpenAIResponses(model="gpt-4.1", api_key="sk-client", api_base=base_url, max_retries=0)
    chat = echo.chat([ChatMessage(role="user", content="hello there")])
    results = {"chat": chat.message.content}
    chunks = list(echo.stream_chat([ChatMessage(role="system", content="Be brief."),
                                    ChatMessage(role="user", content="hello again")]))
    results["stream"] = chunks[-1].message.content  # each chunk holds the text so far

    llm = OpenAIResponses(model="gpt-4.1-mini", api_key="sk-client", api_base=base_url,
                          max_retries=0)
    tool = FunctionTool.from_defaults(fn=get_weather)
    question = ChatMessage(role="user", content="Weather in Paris?")
    response = llm.chat_with_tools([tool], chat_history=[question])
    [call] = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    results["tool_call"] = {"name": call.tool_name, "kwargs": call.tool_kwargs}
    output = tool.call(**call.tool_kwargs)
    history = [question, response.message,
               ChatMessage(role="tool", content=str(output),
                           additional_kwargs={"tool_call_id": call.tool_id,
                                              "name": call.tool_name})]
    results["tool_answer"] = llm.chat_with_tools([tool], chat_history=history).message.content
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
