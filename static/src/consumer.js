// consumer.js — the page's one Action Cable consumer. Every controller subscribes through
// it, so a page with 24 live product cards still opens a single WebSocket to /cable
// (the consumer connects lazily, on the first subscription; the session cookie authenticates).
import { createConsumer } from "@rails/actioncable";

export const consumer = createConsumer("/cable");
