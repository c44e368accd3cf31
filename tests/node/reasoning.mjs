// The Vercel AI SDK against ORP: does `reasoningText` carry the model's reasoning, with
// generateText and with streamText? Run by tests/test_reasoning_clients.py as
//   node reasoning.mjs <ORP base URL ending in /v1> <open-responses|openai>
// and prints {"generateText": {...}, "streamText": {...}} as JSON on stdout.
import { generateText, streamText } from "ai";
import { createOpenResponses } from "@ai-sdk/open-responses";
import { createOpenAI } from "@ai-sdk/openai";

const [baseURL, provider] = process.argv.slice(2);
const prompt = "hello there";

let model;
let providerOptions;
if (provider === "open-responses") {
  // The Open Responses provider: raw reasoning (`content`, reasoning_text deltas).
  model = createOpenResponses({ name: "orp", url: `${baseURL}/responses` })("mock-reasoning");
  providerOptions = { orp: { reasoningEffort: "low" } };
} else {
  // The OpenAI provider reads only reasoning summaries: ask for one.
  model = createOpenAI({ baseURL, apiKey: "sk-client" }).responses("mock-reasoning");
  providerOptions = {
    openai: { forceReasoning: true, reasoningEffort: "low", reasoningSummary: "auto" },
  };
}

const generated = await generateText({ model, prompt, providerOptions });
const streamed = streamText({ model, prompt, providerOptions });
const streamedText = await streamed.text;
const streamedReasoning = await streamed.reasoningText;

process.stdout.write(
  JSON.stringify({
    generateText: { text: generated.text, reasoningText: generated.reasoningText ?? "" },
    streamText: { text: streamedText, reasoningText: streamedReasoning ?? "" },
  }),
);
