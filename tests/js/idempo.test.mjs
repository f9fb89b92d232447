// Unit tests of idempo.js on Node's own test runner (`node --test tests/js/`), with no npm package: a fake `fetch`,
// a fake clock and sleep, and small fake DOM elements for the submit helper. tests/test_demo_js.py runs them.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  DEFAULT_RETRY_STATUSES,
  State,
  TRANSITIONS,
  idempotentFetch,
  idempotentSubmit,
  isOutcomeUnknownProblem,
  newKey,
  nextState,
  outcomeUnknown,
  parseRetryAfter,
  readProblem,
} from "../../src/idempo/static/idempo.js";

const URL_ = "http://service.test/charges";
const UUID4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/**
 * A scripted fetch: each call takes the next step, a status (number), a Response, an Error to throw, or "hang"
 * (never answers; rejects with the signal's reason when aborted). Records what each attempt sent.
 */
function scripted(...steps) {
  const calls = [];
  const fetch = async (request, init) => {
    calls.push({ method: request.method, key: request.headers.get("Idempotency-Key"), body: await request.text() });
    const step = steps[Math.min(calls.length, steps.length) - 1];
    if (step === "hang") {
      return new Promise((_, reject) => {
        if (init.signal.aborted) reject(init.signal.reason);
        init.signal.addEventListener("abort", () => reject(init.signal.reason));
      });
    }
    if (step instanceof Error) throw step;
    if (typeof step === "number") return new Response(step === 204 ? null : "{}", { status: step });
    return step;
  };
  return { fetch, calls };
}

/** A fake clock that only moves when the fake sleep is called; records every wait. */
function fakeTime() {
  const time = { now: 0, sleeps: [] };
  time.options = {
    now: () => time.now,
    sleep: async (ms) => {
      time.sleeps.push(ms);
      time.now += ms;
    },
  };
  return time;
}

const post = { method: "POST", body: '{"amount":1000}', headers: { "Content-Type": "application/json" } };

describe("idempotentFetch: keys", () => {
  for (const method of ["POST", "PUT", "PATCH", "DELETE"]) {
    it(`gives a ${method} a fresh UUIDv4 key`, async () => {
      const { fetch, calls } = scripted(201);
      await idempotentFetch(URL_, { method }, { fetch });
      assert.match(calls[0].key, UUID4);
    });
  }

  it("gives a GET no key", async () => {
    const { fetch, calls } = scripted(200);
    await idempotentFetch(URL_, {}, { fetch });
    assert.equal(calls[0].key, null);
  });

  it("keeps a key the caller set, and uses options.key when there is none", async () => {
    const { fetch, calls } = scripted(201);
    await idempotentFetch(URL_, { ...post, headers: { "Idempotency-Key": "mine" } }, { fetch, key: "other" });
    await idempotentFetch(URL_, post, { fetch, key: "given" });
    assert.deepEqual(calls.map((c) => c.key), ["mine", "given"]);
  });

  it("gives two calls two different keys", async () => {
    const { fetch, calls } = scripted(201);
    await idempotentFetch(URL_, post, { fetch });
    await idempotentFetch(URL_, post, { fetch });
    assert.notEqual(calls[0].key, calls[1].key);
  });
});

describe("idempotentFetch: retries", () => {
  for (const status of DEFAULT_RETRY_STATUSES) {
    it(`retries a ${status} with the same key and the same body`, async () => {
      const { fetch, calls } = scripted(status, 201);
      const response = await idempotentFetch(URL_, post, { fetch, ...fakeTime().options });
      assert.equal(response.status, 201);
      assert.equal(calls.length, 2);
      assert.equal(calls[0].key, calls[1].key);
      assert.deepEqual(calls.map((c) => c.body), [post.body, post.body]);
    });
  }

  it("retries a network error (a TypeError) with the same key", async () => {
    const { fetch, calls } = scripted(new TypeError("Failed to fetch"), 201);
    const response = await idempotentFetch(URL_, post, { fetch, ...fakeTime().options });
    assert.equal(response.status, 201);
    assert.equal(new Set(calls.map((c) => c.key)).size, 1);
  });

  for (const status of [400, 401, 404, 410, 413, 422, 500]) {
    it(`never retries a ${status}`, async () => {
      const { fetch, calls } = scripted(status, 201);
      const response = await idempotentFetch(URL_, post, { fetch, ...fakeTime().options });
      assert.equal(response.status, status);
      assert.equal(calls.length, 1);
    });
  }

  it("retries a 500 when retryStatuses says so", async () => {
    const { fetch, calls } = scripted(500, 201);
    await idempotentFetch(URL_, post, { fetch, retryStatuses: [500], ...fakeTime().options });
    assert.equal(calls.length, 2);
  });

  it("does not rethrow errors that are not network errors", async () => {
    const { fetch, calls } = scripted(new RangeError("a bug"), 201);
    await assert.rejects(idempotentFetch(URL_, post, { fetch, ...fakeTime().options }), RangeError);
    assert.equal(calls.length, 1);
  });

  it("sends a GET once: no retry on a network error or a 503", async () => {
    const failing = scripted(new TypeError("Failed to fetch"), 200);
    await assert.rejects(idempotentFetch(URL_, {}, { fetch: failing.fetch, ...fakeTime().options }), TypeError);
    const busy = scripted(503, 200);
    assert.equal((await idempotentFetch(URL_, {}, { fetch: busy.fetch, ...fakeTime().options })).status, 503);
    assert.deepEqual([failing.calls.length, busy.calls.length], [1, 1]);
  });

  it("makes at most `attempts` attempts and returns the last response", async () => {
    const { fetch, calls } = scripted(503);
    const response = await idempotentFetch(URL_, post, { fetch, attempts: 3, ...fakeTime().options });
    assert.equal(response.status, 503);
    assert.equal(calls.length, 3);
  });

  it("throws the last network error once the attempts are spent", async () => {
    const error = new TypeError("Failed to fetch");
    const { fetch, calls } = scripted(error);
    await assert.rejects(idempotentFetch(URL_, post, { fetch, attempts: 4, ...fakeTime().options }), (e) => e === error);
    assert.equal(calls.length, 4);
  });

  it("rejects attempts below 1", async () => {
    await assert.rejects(idempotentFetch(URL_, post, { attempts: 0 }), RangeError);
  });
});

describe("idempotentFetch: waits", () => {
  it("backs off with full jitter: random() times a ceiling that doubles up to the cap", async () => {
    const time = fakeTime();
    const { fetch } = scripted(503, 503, 503, 503, 503, 201);
    await idempotentFetch(URL_, post, {
      fetch,
      attempts: 6,
      backoffBase: 100,
      backoffCap: 500,
      maxElapsed: 60_000,
      random: () => 0.5,
      ...time.options,
    });
    assert.deepEqual(time.sleeps, [50, 100, 200, 250, 250]);
  });

  it("waits exactly the Retry-After seconds", async () => {
    const time = fakeTime();
    const { fetch } = scripted(new Response("", { status: 429, headers: { "Retry-After": "3" } }), 201);
    await idempotentFetch(URL_, post, { fetch, ...time.options });
    assert.deepEqual(time.sleeps, [3000]);
  });

  it("measures a Retry-After date from the response's own Date", async () => {
    const time = fakeTime();
    const headers = { "Retry-After": "Wed, 21 Oct 2015 07:28:05 GMT", Date: "Wed, 21 Oct 2015 07:28:00 GMT" };
    const { fetch } = scripted(new Response("", { status: 503, headers }), 201);
    await idempotentFetch(URL_, post, { fetch, ...time.options });
    assert.deepEqual(time.sleeps, [5000]);
  });

  it("never waits past maxElapsed: it gives up with the response it has", async () => {
    const time = fakeTime();
    const { fetch, calls } = scripted(new Response("", { status: 503, headers: { "Retry-After": "20" } }), 201);
    const response = await idempotentFetch(URL_, post, { fetch, maxElapsed: 10_000, ...time.options });
    assert.equal(response.status, 503);
    assert.equal(calls.length, 1);
    assert.deepEqual(time.sleeps, []);
  });

  it("retries an attempt that runs out of its timeout, with the same key", async () => {
    const { fetch, calls } = scripted("hang", 201);
    const results = [];
    const response = await idempotentFetch(URL_, post, {
      fetch,
      timeout: 20,
      sleep: async () => {},
      onResult: (info) => results.push(info),
    });
    assert.equal(response.status, 201);
    assert.equal(calls[0].key, calls[1].key);
    assert.deepEqual(results.map((r) => [r.status, r.timedOut]), [[null, true], [201, false]]);
    assert.equal(results[0].error.name, "TimeoutError");
  });

  it("throws a TimeoutError when every attempt times out", async () => {
    const { fetch } = scripted("hang");
    await assert.rejects(idempotentFetch(URL_, post, { fetch, timeout: 5, attempts: 2, sleep: async () => {} }), {
      name: "TimeoutError",
    });
  });
});

describe("idempotentFetch: the caller's AbortSignal", () => {
  it("aborts the attempt in flight, and nothing is retried", async () => {
    const controller = new AbortController();
    const { fetch, calls } = scripted("hang", 201);
    const pending = idempotentFetch(URL_, post, {
      fetch,
      signal: controller.signal,
      timeout: 0,
      onAttempt: () => queueMicrotask(() => controller.abort(new Error("stop"))),
    });
    await assert.rejects(pending, { message: "stop" });
    assert.equal(calls.length, 1);
  });

  it("aborts a wait between attempts (init.signal works too)", async () => {
    const controller = new AbortController();
    const { fetch, calls } = scripted(new Response("", { status: 503, headers: { "Retry-After": "10" } }), 201);
    const pending = idempotentFetch(URL_, { ...post, signal: controller.signal }, {
      fetch,
      onResult: () => setTimeout(() => controller.abort(new Error("gave up")), 1),
    });
    await assert.rejects(pending, { message: "gave up" });
    assert.equal(calls.length, 1);
  });

  it("does not start when the signal is already aborted", async () => {
    const { fetch, calls } = scripted(201);
    await assert.rejects(idempotentFetch(URL_, post, { fetch, signal: AbortSignal.abort(new Error("no")) }), {
      message: "no",
    });
    assert.equal(calls.length, 0);
  });
});

describe("idempotentFetch: callbacks", () => {
  it("tells each attempt and its result, with the key, the status, replayed and the next wait", async () => {
    const seen = [];
    const replay = new Response("{}", { status: 201, headers: { "Idempotent-Replayed": "true" } });
    const { fetch } = scripted(new Response("", { status: 409, headers: { "Retry-After": "1" } }), replay);
    await idempotentFetch(URL_, post, {
      fetch,
      ...fakeTime().options,
      onAttempt: (info) => seen.push(["attempt", info.attempt, info.method]),
      onResult: (info) => seen.push(["result", info.attempt, info.status, info.replayed, info.retryIn]),
    });
    assert.deepEqual(seen, [
      ["attempt", 1, "POST"],
      ["result", 1, 409, false, 1000],
      ["attempt", 2, "POST"],
      ["result", 2, 201, true, null],
    ]);
  });
});

/** The 503 a server answers a retry with when the first request's outcome is unknown. Its Retry-After (the
 * record's remaining life) is short enough that a client which retried it would do so within its deadline. */
function unknownOutcome({ base = "urn:idempo:problem:", contentType = "application/problem+json", retryAfter = "2" } = {}) {
  const document = {
    type: `${base}outcome-unknown`,
    title: "The outcome of the request with this Idempotency-Key is unknown",
    status: 503,
    detail: "it may have taken effect, so it is not run again",
  };
  return new Response(JSON.stringify(document), {
    status: 503,
    headers: { "Content-Type": contentType, "Retry-After": retryAfter },
  });
}

describe("idempotentFetch: a 503 outcome-unknown", () => {
  const variants = [
    { base: "urn:idempo:problem:", contentType: "application/problem+json" },
    { base: "https://docs.example/problems#", contentType: "application/problem+json; charset=utf-8" },
    { base: "https://docs.example/problems/", contentType: "Application/Problem+JSON" },
  ];
  for (const variant of variants) {
    it(`is returned at once, readable (${variant.base}, ${variant.contentType})`, async () => {
      const time = fakeTime();
      const results = [];
      const { fetch, calls } = scripted(unknownOutcome(variant), 201);
      const response = await idempotentFetch(URL_, post, { fetch, ...time.options, onResult: (r) => results.push(r) });
      assert.equal(response.status, 503);
      assert.equal((await response.json()).type, `${variant.base}outcome-unknown`);
      assert.equal(calls.length, 1);
      assert.deepEqual(time.sleeps, []);
      assert.deepEqual(results.map((r) => [r.status, r.outcomeUnknown, r.retryIn]), [[503, true, null]]);
    });
  }

  it("follows a 504 retried with the same key, and stops the retries", async () => {
    const time = fakeTime();
    const { fetch, calls } = scripted(504, unknownOutcome(), 201);
    const response = await idempotentFetch(URL_, post, { fetch, ...time.options });
    assert.equal(response.status, 503);
    assert.equal(calls.length, 2);
    assert.equal(calls[0].key, calls[1].key);
    assert.equal(time.sleeps.length, 1);
  });

  const others = {
    "another problem type": () =>
      new Response('{"type":"urn:idempo:problem:store-unavailable"}', {
        status: 503,
        headers: { "Content-Type": "application/problem+json" },
      }),
    "plain JSON": () =>
      new Response('{"type":"urn:idempo:problem:outcome-unknown"}', {
        status: 503,
        headers: { "Content-Type": "application/json" },
      }),
    "malformed JSON": () =>
      new Response("{not json", { status: 503, headers: { "Content-Type": "application/problem+json" } }),
    "an array": () =>
      new Response('["outcome-unknown"]', { status: 503, headers: { "Content-Type": "application/problem+json" } }),
    "a type that is not a string": () =>
      new Response('{"type":7}', { status: 503, headers: { "Content-Type": "application/problem+json" } }),
    "no content type": () => new Response("Service Unavailable", { status: 503 }),
  };
  for (const [name, make] of Object.entries(others)) {
    it(`leaves any other 503 retried: ${name}`, async () => {
      const results = [];
      const { fetch, calls } = scripted(make(), 201);
      const response = await idempotentFetch(URL_, post, {
        fetch,
        ...fakeTime().options,
        onResult: (r) => results.push(r.outcomeUnknown),
      });
      assert.equal(response.status, 201);
      assert.equal(calls.length, 2);
      assert.deepEqual(results, [false, false]);
    });
  }

  it("is not special on another status", async () => {
    const conflict = new Response('{"type":"x:outcome-unknown"}', {
      status: 409,
      headers: { "Content-Type": "application/problem+json" },
    });
    const { fetch, calls } = scripted(conflict, 201);
    assert.equal((await idempotentFetch(URL_, post, { fetch, ...fakeTime().options })).status, 201);
    assert.equal(calls.length, 2);
  });
});

describe("readProblem and isOutcomeUnknownProblem", () => {
  it("read a problem document from a clone, so that the response stays readable", async () => {
    const response = unknownOutcome();
    const problem = await readProblem(response);
    assert.equal(isOutcomeUnknownProblem(response.status, problem), true);
    assert.equal((await response.json()).status, 503);
  });

  it("read nothing that is not a problem document", async () => {
    assert.equal(await readProblem(new Response('{"type":"x"}', { headers: { "Content-Type": "application/json" } })), null);
    assert.equal(await readProblem(new Response("[1]", { headers: { "Content-Type": "application/problem+json" } })), null);
    assert.equal(await readProblem(new Response("null", { headers: { "Content-Type": "application/problem+json" } })), null);
    assert.equal(await readProblem(new Response("oops", { headers: { "Content-Type": "application/problem+json" } })), null);
  });

  it("tell outcome-unknown only on a 503", () => {
    const type = "urn:idempo:problem:outcome-unknown";
    assert.equal(isOutcomeUnknownProblem(503, { type }), true);
    assert.equal(isOutcomeUnknownProblem(504, { type }), false);
    assert.equal(isOutcomeUnknownProblem(503, { type: "urn:idempo:problem:in-progress" }), false);
    assert.equal(isOutcomeUnknownProblem(503, null), false);
    assert.equal(isOutcomeUnknownProblem(503, "outcome-unknown"), false);
  });
});

describe("parseRetryAfter", () => {
  const date = "Sun, 06 Nov 1994 08:49:37 GMT";
  const cases = [
    ["0", null, 0],
    [" 7 ", null, 7000],
    ["Sun, 06 Nov 1994 08:49:40 GMT", date, 3000],
    ["Sunday, 06-Nov-94 08:49:47 GMT", date, 10_000],
    ["Sun Nov  6 08:49:39 1994", date, 2000],
    ["Sun, 06 Nov 1994 08:49:00 GMT", date, 0], // in the past: no wait
    ["-1", null, null],
    ["1.5", null, null],
    ["soon", null, null],
    [null, null, null],
  ];
  for (const [value, from, expected] of cases) {
    it(`reads ${JSON.stringify(value)} as ${expected}`, () => {
      assert.equal(parseRetryAfter(value, from), expected);
    });
  }

  it("measures a date from now when the response has no Date", () => {
    assert.equal(parseRetryAfter("Sun, 06 Nov 1994 08:49:40 GMT", null, Date.parse(date)), 3000);
  });
});

describe("newKey", () => {
  it("is a UUIDv4", () => {
    assert.match(newKey(), UUID4);
  });

  it("is a UUIDv4 from getRandomValues where randomUUID is missing (not a secure context)", (t) => {
    const real = globalThis.crypto;
    const descriptor = Object.getOwnPropertyDescriptor(globalThis, "crypto");
    if (!descriptor?.configurable) {
      t.skip("globalThis.crypto cannot be replaced here");
      return;
    }
    Object.defineProperty(globalThis, "crypto", {
      configurable: true,
      value: { getRandomValues: (array) => real.getRandomValues(array) },
    });
    try {
      const keys = new Set([newKey(), newKey()]);
      assert.equal(keys.size, 2);
      for (const key of keys) assert.match(key, UUID4);
    } finally {
      Object.defineProperty(globalThis, "crypto", descriptor);
    }
  });
});

describe("the state machine", () => {
  const events = ["submit", "succeed", "fail", "reset"];
  const expected = {
    ready: { submit: "submitting" },
    submitting: { succeed: "success", fail: "fail" },
    success: { submit: "submitting", reset: "ready" },
    fail: { submit: "submitting", reset: "ready" },
  };
  it("has exactly the transitions of the table", () => {
    for (const state of Object.values(State)) {
      for (const event of events) assert.equal(nextState(state, event), expected[state][event] ?? null, `${state} + ${event}`);
    }
    assert.deepEqual(JSON.parse(JSON.stringify(TRANSITIONS)), expected);
  });

  it("calls an outcome unknown without a response or after 409, 502, 503, 504", () => {
    assert.equal(outcomeUnknown(null), true);
    for (const status of [409, 502, 503, 504]) assert.equal(outcomeUnknown(new Response("", { status })), true);
    for (const status of [400, 422, 429, 500]) assert.equal(outcomeUnknown(new Response("", { status })), false);
  });
});

/** Just enough of an element for idempotentSubmit: attributes, events, and a submit button inside a form. */
class FakeElement extends EventTarget {
  constructor(tagName, children = []) {
    super();
    this.tagName = tagName;
    this.attributes = new Map();
    this.children = children;
    this.disabled = false;
    this.textContent = "";
  }
  setAttribute(name, value) {
    this.attributes.set(name, String(value));
  }
  getAttribute(name) {
    return this.attributes.get(name) ?? null;
  }
  removeAttribute(name) {
    this.attributes.delete(name);
  }
  querySelector() {
    return this.children[0] ?? null;
  }
}

function fakeForm() {
  const button = new FakeElement("BUTTON");
  const form = new FakeElement("FORM", [button]);
  const status = new FakeElement("DIV");
  return { form, button, status };
}

function problem(status, title, detail) {
  return new Response(JSON.stringify({ title, detail, status }), {
    status,
    headers: { "Content-Type": "application/problem+json" },
  });
}

function bind(form, status, fetch, options = {}) {
  return idempotentSubmit(form, {
    status,
    request: () => ({ url: URL_, init: post }),
    fetchOptions: { fetch, sleep: async () => {} },
    ...options,
  });
}

describe("idempotentSubmit", () => {
  it("starts READY with a key and the button enabled", () => {
    const { form, button, status } = fakeForm();
    const controller = bind(form, status, scripted(201).fetch);
    assert.equal(controller.state, State.READY);
    assert.equal(form.getAttribute("data-idempo-state"), "ready");
    assert.match(controller.key, UUID4);
    assert.equal(button.disabled, false);
  });

  it("disables the button at once while SUBMITTING, and ignores another submission", async () => {
    const { form, button, status } = fakeForm();
    let answer;
    const calls = [];
    const fetch = (request) => {
      calls.push(request.headers.get("Idempotency-Key"));
      return new Promise((resolve) => (answer = resolve));
    };
    const controller = bind(form, status, fetch);
    const key = controller.key;
    const first = controller.submit();
    assert.equal(controller.state, State.SUBMITTING);
    assert.equal(button.disabled, true);
    assert.equal(button.getAttribute("aria-busy"), "true");
    assert.equal(await controller.submit(), false); // the double click
    await new Promise((resolve) => setImmediate(resolve));
    answer(new Response('{"id":"ch_1"}', { status: 201, headers: { "Content-Type": "application/json" } }));
    assert.equal(await first, true);
    assert.deepEqual(calls, [key]);
    assert.equal(controller.state, State.SUCCESS);
    assert.equal(button.getAttribute("aria-busy"), null);
  });

  it("on SUCCESS shows the message and keeps the button disabled (a payment is done once)", async () => {
    const { form, button, status } = fakeForm();
    const states = [];
    const body = { id: "ch_1" };
    const ok = new Response(JSON.stringify(body), { status: 201, headers: { "Content-Type": "application/json" } });
    const controller = bind(form, status, scripted(ok).fetch, { successMessage: ({ body }) => `paid ${body.id}` });
    controller.addEventListener("statechange", (e) => states.push(e.detail.state));
    const key = controller.key;
    assert.equal(await controller.submit(), true);
    assert.deepEqual(states, ["submitting", "success"]);
    assert.equal(status.textContent, "paid ch_1");
    assert.equal(status.getAttribute("data-kind"), "success");
    assert.equal(button.disabled, true);
    assert.equal(controller.key, key);
    assert.equal(await controller.submit(), false);
  });

  it("with again, allows the next submission after a SUCCESS, with a new key", async () => {
    const { form, button, status } = fakeForm();
    const { fetch, calls } = scripted(201);
    const controller = bind(form, status, fetch, { again: true });
    await controller.submit();
    assert.equal(button.disabled, false);
    await controller.submit();
    assert.equal(calls.length, 2);
    assert.notEqual(calls[0].key, calls[1].key);
  });

  it("follows redirect after a success", async () => {
    const { form, status } = fakeForm();
    const went = [];
    const controller = bind(form, status, scripted(201).fetch, { redirect: "/thanks", navigate: (url) => went.push(url) });
    await controller.submit();
    assert.deepEqual(went, ["/thanks"]);
  });

  it("on a definite FAIL (a 422) shows the problem, enables the button and makes a new key", async () => {
    const { form, button, status } = fakeForm();
    const fetch = scripted(problem(422, "Idempotency-Key reused with a different request", "key k")).fetch;
    const controller = bind(form, status, fetch);
    const key = controller.key;
    const keys = [];
    controller.addEventListener("key", (e) => keys.push(e.detail.key));
    assert.equal(await controller.submit(), false);
    assert.equal(controller.state, State.FAIL);
    assert.equal(form.getAttribute("data-idempo-state"), "fail");
    assert.equal(status.textContent, "422: Idempotency-Key reused with a different request: key k");
    assert.equal(status.getAttribute("data-kind"), "error");
    assert.equal(button.disabled, false);
    assert.notEqual(controller.key, key);
    assert.deepEqual(keys, [controller.key]);
  });

  it("when the outcome is unknown (no response), keeps the key so that submitting again is a retry", async () => {
    const { form, button, status } = fakeForm();
    const { fetch, calls } = scripted(new TypeError("Failed to fetch"), new TypeError("x"), new TypeError("x"), 201);
    const controller = bind(form, status, fetch, { fetchOptions: { fetch, sleep: async () => {}, attempts: 3 } });
    const key = controller.key;
    assert.equal(await controller.submit(), false);
    assert.equal(controller.key, key);
    assert.match(status.textContent, /Trying again is safe/);
    assert.equal(button.disabled, false);
    assert.equal(await controller.submit(), true);
    assert.deepEqual(new Set(calls.map((c) => c.key)), new Set([key]));
  });

  it("keeps the key after a final 409 too, unless rekey is 'always'", async () => {
    const kept = fakeForm();
    const keeping = bind(kept.form, kept.status, scripted(409).fetch);
    const key = keeping.key;
    await keeping.submit();
    assert.equal(keeping.key, key);

    const always = fakeForm();
    const rekeying = bind(always.form, always.status, scripted(409).fetch, { rekey: "always" });
    const old = rekeying.key;
    await rekeying.submit();
    assert.notEqual(rekeying.key, old);
  });

  it("submits on the form's submit event, and stops listening once destroyed", async () => {
    const { form, status } = fakeForm();
    const { fetch, calls } = scripted(201);
    const controller = bind(form, status, fetch, { again: true });
    const event = new Event("submit", { cancelable: true });
    const done = new Promise((resolve) => controller.addEventListener("success", resolve, { once: true }));
    form.dispatchEvent(event);
    assert.equal(event.defaultPrevented, true);
    await done;
    controller.destroy();
    form.dispatchEvent(new Event("submit", { cancelable: true }));
    assert.equal(calls.length, 1);
  });

  it("binds a button on click", async () => {
    const button = new FakeElement("BUTTON");
    const { fetch, calls } = scripted(201);
    const controller = idempotentSubmit(button, { request: () => ({ url: URL_, init: post }), fetchOptions: { fetch } });
    const done = new Promise((resolve) => controller.addEventListener("success", resolve, { once: true }));
    button.dispatchEvent(new Event("click", { cancelable: true }));
    await done;
    assert.equal(calls.length, 1);
    assert.equal(button.disabled, true);
  });

  it("takes another key with useKey, except while SUBMITTING; reset gives a new one", async () => {
    const { form, status } = fakeForm();
    const { fetch, calls } = scripted(problem(422, "reused", "k"), 201);
    const controller = bind(form, status, fetch);
    assert.equal(controller.useKey("earlier"), true);
    const pending = controller.submit();
    assert.equal(controller.useKey("other"), false);
    await pending;
    assert.equal(calls[0].key, "earlier");
    controller.reset();
    assert.equal(controller.state, State.READY);
    assert.equal(status.textContent, "");
    assert.notEqual(controller.key, "earlier");
  });

  it("abort() ends the submission in FAIL with the key kept", async () => {
    const { form, status } = fakeForm();
    const controller = bind(form, status, scripted("hang").fetch);
    const key = controller.key;
    controller.addEventListener("attempt", () => queueMicrotask(() => controller.abort()), { once: true });
    assert.equal(await controller.submit(), false);
    assert.equal(controller.state, State.FAIL);
    assert.equal(controller.key, key);
  });

  it("emits attempt and result events for each attempt", async () => {
    const { form, status } = fakeForm();
    const controller = bind(form, status, scripted(503, 201).fetch);
    const seen = [];
    controller.addEventListener("attempt", (e) => seen.push(["attempt", e.detail.attempt]));
    controller.addEventListener("result", (e) => seen.push(["result", e.detail.attempt, e.detail.status]));
    await controller.submit();
    assert.deepEqual(seen, [
      ["attempt", 1],
      ["result", 1, 503],
      ["attempt", 2],
      ["result", 2, 201],
    ]);
  });
});

describe("idempotentSubmit: a request builder that throws", () => {
  it("leaves the state as it was", async () => {
    const { form, button, status } = fakeForm();
    const controller = idempotentSubmit(form, {
      status,
      request: () => {
        throw new Error("bug");
      },
    });
    await assert.rejects(controller.submit(), { message: "bug" });
    assert.equal(controller.state, State.READY);
    assert.equal(button.disabled, false);
  });
});

describe("idempotentSubmit: when the server says the outcome is unknown", () => {
  it("FAILs keeping the key, tells the page outcome 'unknown' with the problem, and never rekeys", async () => {
    for (const rekey of ["unknown-keeps", "always"]) {
      const { form, button, status } = fakeForm();
      const { fetch, calls } = scripted(504, unknownOutcome(), unknownOutcome());
      const controller = bind(form, status, fetch, { rekey });
      const key = controller.key;
      const failed = [];
      controller.addEventListener("fail", (e) => failed.push(e.detail));
      assert.equal(await controller.submit(), false);
      assert.equal(controller.state, State.FAIL);
      assert.equal(controller.key, key, rekey);
      assert.equal(button.disabled, false);
      const [detail] = failed;
      assert.equal(detail.outcome, "unknown");
      assert.equal(detail.unknown, true);
      assert.equal(detail.problem.type, "urn:idempo:problem:outcome-unknown");
      assert.equal(detail.problem.status, 503);
      assert.match(status.textContent, /We don't know whether this went through/);
      assert.match(status.textContent, /Don't do it again/);
      assert.doesNotMatch(status.textContent, /Trying again is safe/);
      await controller.submit(); // the user's next click: the same key, so the same answer, never a second charge
      assert.deepEqual(new Set(calls.map((c) => c.key)), new Set([key]));
      assert.equal(calls.length, 3); // the 504, its retry's 503, and the next click's 503: no retry of a 503
    }
  });

  it("FAILs keeping the key after a 410 response-not-stored: the operation was done", async () => {
    const { form, status } = fakeForm();
    const gone = new Response(
      JSON.stringify({
        type: "urn:idempo:problem:response-not-stored",
        title: "The original response was not stored",
        status: 410,
        detail: "an operator recorded that it ran",
        original_status: 200,
        reason: "operator",
      }),
      { status: 410, headers: { "Content-Type": "application/problem+json" } },
    );
    const controller = bind(form, status, scripted(gone).fetch, { rekey: "always" });
    const key = controller.key;
    const failed = [];
    controller.addEventListener("fail", (e) => failed.push(e.detail));
    await controller.submit();
    assert.equal(controller.key, key);
    assert.equal(failed[0].outcome, "not-stored");
    assert.equal(failed[0].unknown, false);
    assert.equal(failed[0].problem.reason, "operator");
    assert.equal(status.textContent, "This was already done (status 200), but its result cannot be shown again. It will not be done twice.");
  });

  it("tells every way a submission ends apart", async () => {
    const cases = [
      [201, "success", null],
      [problem(422, "reused", "k"), "failed", "422"],
      [new TypeError("Failed to fetch"), "unconfirmed", null],
      [504, "unconfirmed", null],
      [unknownOutcome(), "unknown", "503"],
    ];
    for (const [step, expected, problemStatus] of cases) {
      const { form, status } = fakeForm();
      const controller = bind(form, status, scripted(step).fetch, { fetchOptions: { fetch: scripted(step).fetch, sleep: async () => {}, attempts: 1 } });
      let seen = null;
      const record = (e) => (seen = e.detail);
      controller.addEventListener("success", record);
      controller.addEventListener("fail", record);
      await controller.submit();
      assert.equal(seen.outcome, expected, String(step));
      assert.equal(seen.problem === null ? null : String(seen.problem.status), problemStatus, String(step));
    }
  });
});
