// @ts-check
/**
 * idempo.js: make retried HTTP mutations safe from the browser, with the `Idempotency-Key` pattern.
 *
 * A dependency-free ES module (no build step) with two parts:
 *
 * - {@link idempotentFetch}: `fetch` that gives every POST, PUT, PATCH and DELETE a fresh UUIDv4
 *   `Idempotency-Key` (unless it has one) and retries it with the SAME key on network errors, timeouts and the
 *   statuses 409, 429, 502, 503 and 504, with exponential backoff and full jitter, honouring `Retry-After`;
 *   except a 503 outcome-unknown problem, which no retry can change. The rules are those of idempo's Python
 *   client (`idempo.client`).
 * - {@link idempotentSubmit}: binds a form or a button to the state machine
 *   READY (a key is generated) → SUBMITTING (button disabled, `aria-busy`, retries reuse the key) →
 *   SUCCESS (message, optional redirect) or FAIL (error shown, button enabled again, a new key unless the
 *   operation may have happened).
 *
 * ```js
 * import { idempotentFetch, idempotentSubmit } from "/static/idempo.js";
 * const response = await idempotentFetch("/charges", { method: "POST", body: JSON.stringify({ amount: 1000 }) });
 * idempotentSubmit(document.querySelector("form"), { status: document.querySelector("#status") });
 * ```
 *
 * Served by Python from the installed package: `idempo.static.script_path()` (see docs/browser.md).
 * Times are in milliseconds throughout.
 *
 * @module idempo
 */

/** The methods that get a key and are retried: the others are sent once, as `fetch` would. */
export const DEFAULT_METHODS = Object.freeze(["POST", "PUT", "PATCH", "DELETE"]);
/** The statuses a keyed request is retried on. Never other 4xx (the request is wrong), nor 500 by default. */
export const DEFAULT_RETRY_STATUSES = Object.freeze([409, 429, 502, 503, 504]);
/**
 * Final statuses after which the operation's outcome is unknown (still running, or behind a gateway that gave up),
 * so that {@link idempotentSubmit} keeps the key: submitting again then replays instead of running twice.
 */
export const UNKNOWN_OUTCOME_STATUSES = Object.freeze([409, 502, 503, 504]);

/**
 * @typedef {object} AttemptInfo  What {@link FetchOptions.onAttempt} is told before each attempt.
 * @property {number} attempt  1 for the first attempt.
 * @property {string | null} key  The request's key, `null` if its method takes none.
 * @property {string} method
 * @property {string} url
 */

/**
 * @typedef {object} ResultInfo  What {@link FetchOptions.onResult} is told after each attempt.
 * @property {number} attempt
 * @property {string | null} key
 * @property {number | null} status  The response's status, `null` when there was none (network error, timeout).
 * @property {boolean} replayed  Whether the server replayed a stored response (`Idempotent-Replayed: true`).
 * @property {boolean} timedOut  Whether the attempt ran out of its `timeout`.
 * @property {unknown} error  The error the attempt failed with, `null` when it got a response.
 * @property {number | null} retryIn  Milliseconds until the next attempt, `null` if this was the last one.
 * @property {boolean} outcomeUnknown  Whether the response is a 503 outcome-unknown problem (see
 *   {@link isOutcomeUnknownProblem}): the server does not know whether the operation happened, so it is not retried.
 */

/**
 * @typedef {object} FetchOptions
 * @property {string} [header="Idempotency-Key"]  The key header.
 * @property {string} [key]  The key to send when the request has none; a fresh UUIDv4 otherwise.
 * @property {Iterable<string>} [methods=DEFAULT_METHODS]  The methods that get a key and are retried.
 * @property {Iterable<number>} [retryStatuses=DEFAULT_RETRY_STATUSES]  The statuses a keyed request is retried on.
 * @property {number} [attempts=5]  The most attempts, the first included.
 * @property {number} [backoffBase=500]  The jitter ceiling before the first retry, doubling for each further one.
 * @property {number} [backoffCap=10000]  The most the jitter ceiling grows to.
 * @property {number} [maxElapsed=30000]  No wait may end later than this after the call began: a wait that would
 *   is not made, and the last response is returned (or the last error thrown).
 * @property {number} [timeout=10000]  Each attempt's limit for the response's headers to arrive; 0 for none.
 * @property {AbortSignal | null} [signal]  Aborts everything: the attempt in flight, any wait, any retry. The
 *   request's own `init.signal` does the same.
 * @property {(info: AttemptInfo) => void} [onAttempt]  Told before each attempt.
 * @property {(info: ResultInfo) => void} [onResult]  Told after each attempt, before any wait.
 * @property {(input: Request, init?: RequestInit) => Promise<Response>} [fetch]  For tests: the `fetch` to call.
 * @property {(ms: number, signal: AbortSignal | null) => Promise<void>} [sleep]  For tests: how to wait.
 * @property {() => number} [now]  For tests: a monotonic clock in milliseconds, for the deadline.
 * @property {() => number} [random]  For tests: uniform in [0, 1), for the jitter.
 */

/**
 * A fresh UUIDv4: `crypto.randomUUID()`, or the same built from `crypto.getRandomValues()` where the page is not
 * a secure context (plain http on an address other than localhost), which has no `randomUUID`.
 * @returns {string}
 */
export function newKey() {
  const c = globalThis.crypto;
  if (typeof c.randomUUID === "function") return c.randomUUID();
  const b = c.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; // version 4
  b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/**
 * An HTTP-date in milliseconds since the epoch, or `null`: IMF-fixdate and RFC 850 dates (which end in `GMT`) and
 * asctime dates (which have no zone, and are GMT too).
 * @param {string} value
 * @returns {number | null}
 */
function parseHttpDate(value) {
  let text = value.trim();
  if (/^[A-Za-z]{3} [A-Za-z]{3} [ \d]\d \d\d:\d\d:\d\d \d{4}$/.test(text)) text += " GMT";
  else if (!/^[A-Za-z]+, [\d]{1,2}[ -][A-Za-z]{3}[ -]\d{2,4} \d\d:\d\d:\d\d GMT$/.test(text)) return null;
  const when = Date.parse(text);
  return Number.isNaN(when) ? null : when;
}

/**
 * How long `Retry-After` asks to wait, in milliseconds, or `null` if there is none that can be read.
 *
 * Delta-seconds (`"3"`) or an HTTP-date. A date is measured from the response's own `Date` header when there is
 * one (both are the server's clock, so a skewed local clock does not matter), else from *now*; a date in the past
 * means no wait.
 *
 * @param {string | null | undefined} value  The `Retry-After` header.
 * @param {string | null | undefined} [date]  The response's `Date` header.
 * @param {number} [now]  The local wall clock, in milliseconds since the epoch.
 * @returns {number | null}
 */
export function parseRetryAfter(value, date = null, now = Date.now()) {
  if (value == null) return null;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const when = parseHttpDate(text);
  if (when === null) return null;
  const from = (date ? parseHttpDate(date) : null) ?? now;
  return Math.max(0, when - from);
}

/**
 * Wait *ms*, or reject with the signal's reason as soon as it aborts.
 * @param {number} ms
 * @param {AbortSignal | null} signal
 * @returns {Promise<void>}
 */
function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * One signal that aborts when any of *signals* does (`AbortSignal.any`, where the browser has it).
 * @param {(AbortSignal | null | undefined)[]} signals
 * @returns {AbortSignal | null}
 */
function anySignal(signals) {
  const present = /** @type {AbortSignal[]} */ (signals.filter(Boolean));
  if (present.length <= 1) return present[0] ?? null;
  if (typeof AbortSignal.any === "function") return AbortSignal.any(present);
  const controller = new AbortController();
  for (const s of present) {
    if (s.aborted) {
      controller.abort(s.reason);
      break;
    }
    s.addEventListener("abort", () => controller.abort(s.reason), { once: true });
  }
  return controller.signal;
}

/**
 * Whether *contentType* is that of an RFC 9457 problem document (`application/problem+json`, any parameters).
 * @param {string | null} contentType
 * @returns {boolean}
 */
function isProblemType(contentType) {
  return (contentType ?? "").split(";")[0].trim().toLowerCase() === "application/problem+json";
}

/**
 * Whether a response with *status* whose parsed problem document is *problem* is idempo's 503 outcome-unknown: the
 * server cannot tell whether the operation happened (an upstream timed out after the request was sent, say), and
 * keeps the key taken until the record expires or an operator resolves it, so every retry gets the same answer. Any
 * problem `type` ending with `outcome-unknown` matches, whatever the server's problem base URI.
 * @param {number} status
 * @param {unknown} problem  The parsed body, or `null`.
 * @returns {boolean}
 */
export function isOutcomeUnknownProblem(status, problem) {
  if (status !== 503 || problem === null || typeof problem !== "object") return false;
  const type = /** @type {{type?: unknown}} */ (problem).type;
  return typeof type === "string" && type.endsWith("outcome-unknown");
}

/**
 * The response's RFC 9457 problem document, or `null`: parsed only when its `Content-Type` is
 * `application/problem+json` and its body a JSON object. Reads a clone, so the response stays readable.
 * @param {Response} response
 * @returns {Promise<object | null>}
 */
export async function readProblem(response) {
  if (!isProblemType(response.headers.get("Content-Type"))) return null;
  try {
    const document = await response.clone().json();
    return isObject(document) ? document : null;
  } catch {
    return null; // not JSON, or the body failed: not a problem document we can read
  }
}

/**
 * `fetch`, with an `Idempotency-Key` on mutating requests and safe retries.
 *
 * - A POST, PUT, PATCH or DELETE (`options.methods`) without the key header gets `options.key` or a fresh
 *   UUIDv4; a key already on the request is kept. The key is chosen once: every retry carries the same one.
 * - A keyed request is retried on a network error (`fetch` rejects with a `TypeError`), on an attempt that runs
 *   out of `options.timeout`, and on the statuses 409, 429, 502, 503 and 504 (`options.retryStatuses`).
 *   Never on other 4xx, nor on 500 (usually a bug that answers every retry the same way), nor on a 503
 *   outcome-unknown problem ({@link isOutcomeUnknownProblem}), which is returned at once: the server cannot tell
 *   whether the operation happened and gives every retry the same answer until it is resolved. To tell, the body
 *   of a keyed request's 503 `application/problem+json` is read (from a clone; the response stays readable).
 * - Any other request (GET, ...) is sent once, as `fetch` would send it (a browser cannot tell whether a failed
 *   request reached the server, and no key protects it), with the same per-attempt timeout.
 * - Waits are `random() * min(backoffCap, backoffBase * 2 ** (attempt - 1))` (full jitter), unless the response
 *   has `Retry-After` (seconds or an HTTP-date), which is waited exactly. At most `attempts` attempts, and no
 *   wait that would end past `maxElapsed`: then the last response is returned, or the last error thrown.
 * - The caller's `AbortSignal` (`options.signal` or `init.signal`) aborts the attempt in flight and any wait:
 *   the promise rejects with the signal's reason and nothing is retried.
 *
 * Like `fetch`, it resolves with the final response whatever its status, and rejects when there is none.
 *
 * @param {RequestInfo | URL} input  What `fetch` takes.
 * @param {RequestInit} [init]  What `fetch` takes.
 * @param {FetchOptions} [options]
 * @returns {Promise<Response>}
 */
export async function idempotentFetch(input, init = {}, options = {}) {
  const header = options.header ?? "Idempotency-Key";
  const methods = new Set(Array.from(options.methods ?? DEFAULT_METHODS, (m) => m.toUpperCase()));
  const retryStatuses = new Set(options.retryStatuses ?? DEFAULT_RETRY_STATUSES);
  const attempts = options.attempts ?? 5;
  const backoffBase = options.backoffBase ?? 500;
  const backoffCap = options.backoffCap ?? 10_000;
  const maxElapsed = options.maxElapsed ?? 30_000;
  const timeout = options.timeout ?? 10_000;
  const doFetch = options.fetch ?? ((request, requestInit) => globalThis.fetch(request, requestInit));
  const wait = options.sleep ?? sleep;
  const now = options.now ?? (() => performance.now());
  const random = options.random ?? Math.random;
  if (!(attempts >= 1)) throw new RangeError(`attempts must be at least 1, not ${attempts}`);
  if (backoffBase < 0 || backoffCap < 0 || maxElapsed < 0 || timeout < 0) {
    throw new RangeError("backoffBase, backoffCap, maxElapsed and timeout must not be negative");
  }

  const signal = anySignal([options.signal, init.signal, input instanceof Request ? input.signal : null]);
  signal?.throwIfAborted();
  // One Request holds the body; each attempt sends a clone of it, so every retry sends the same bytes.
  const base = new Request(input, { ...init, signal: undefined });
  const keyed = methods.has(base.method.toUpperCase());
  let key = null;
  if (keyed) {
    key = base.headers.get(header) ?? options.key ?? newKey();
    base.headers.set(header, key);
  }
  const deadline = now() + maxElapsed;

  /** @param {number} attempt @param {number | null} retryAfter @returns {number | null} */
  const nextDelay = (attempt, retryAfter) => {
    if (attempt >= attempts) return null;
    const delay = retryAfter ?? random() * Math.min(backoffCap, backoffBase * 2 ** (attempt - 1));
    return now() + delay > deadline ? null : delay; // never wait past the deadline: give up with what we have
  };

  for (let attempt = 1; ; attempt++) {
    options.onAttempt?.({ attempt, key, method: base.method, url: base.url });
    const controller = new AbortController();
    const onAbort = () => controller.abort(signal?.reason);
    signal?.addEventListener("abort", onAbort, { once: true });
    let timedOut = false;
    const timer =
      timeout > 0
        ? setTimeout(() => {
            timedOut = true;
            controller.abort(new DOMException(`no response within ${timeout} ms`, "TimeoutError"));
          }, timeout)
        : undefined;
    /** @type {Response | null} */
    let response = null;
    /** @type {unknown} */
    let error = null;
    let unknownOutcome = false;
    try {
      response = await doFetch(base.clone(), { signal: controller.signal });
      if (keyed && response.status === 503 && retryStatuses.has(503)) {
        // Under the attempt's timeout too: a body that never ends is a 503 like any other, retried.
        unknownOutcome = isOutcomeUnknownProblem(503, await readProblem(response));
      }
    } catch (caught) {
      error = timedOut ? controller.signal.reason : caught;
    } finally {
      clearTimeout(timer);
    }
    if (signal?.aborted) {
      signal.removeEventListener("abort", onAbort);
      throw signal.reason;
    }
    /** @type {number | null} */
    let retryIn = null;
    if (response === null) {
      signal?.removeEventListener("abort", onAbort);
      if (keyed && (timedOut || error instanceof TypeError)) retryIn = nextDelay(attempt, null);
    } else if (keyed && retryStatuses.has(response.status) && !unknownOutcome) {
      const retryAfter = parseRetryAfter(response.headers.get("Retry-After"), response.headers.get("Date"));
      retryIn = nextDelay(attempt, retryAfter);
    }
    options.onResult?.({
      attempt,
      key,
      status: response?.status ?? null,
      replayed: response?.headers.get("Idempotent-Replayed") === "true",
      timedOut,
      error,
      retryIn,
      outcomeUnknown: unknownOutcome,
    });
    if (retryIn === null) {
      if (response === null) throw error;
      // The caller's signal stays linked to this attempt, so that aborting it also stops reading the body.
      return response;
    }
    if (response !== null) {
      signal?.removeEventListener("abort", onAbort);
      response.body?.cancel().catch(() => {}); // let the connection go back to the pool
    }
    await wait(retryIn, signal);
  }
}

/** The states of {@link idempotentSubmit}, as they appear in `data-idempo-state`. */
export const State = Object.freeze({
  READY: "ready",
  SUBMITTING: "submitting",
  SUCCESS: "success",
  FAIL: "fail",
});

/**
 * Every transition of the submit state machine, as data: `TRANSITIONS[state][event]` is the next state. An event
 * a state does not list is ignored (a second click while SUBMITTING does nothing).
 *
 * - `submit`: READY, FAIL (and SUCCESS, when `again` allows another submission) → SUBMITTING, with the current key.
 * - `succeed`: SUBMITTING → SUCCESS (a 2xx); `fail`: SUBMITTING → FAIL (anything else).
 * - `reset`: SUCCESS or FAIL → READY, with a new key.
 */
export const TRANSITIONS = Object.freeze({
  ready: Object.freeze({ submit: "submitting" }),
  submitting: Object.freeze({ succeed: "success", fail: "fail" }),
  success: Object.freeze({ submit: "submitting", reset: "ready" }),
  fail: Object.freeze({ submit: "submitting", reset: "ready" }),
});

/**
 * The state *event* leads to from *state*, or `null` if *state* ignores it.
 * @param {string} state
 * @param {string} event
 * @returns {string | null}
 */
export function nextState(state, event) {
  const row = /** @type {Record<string, Record<string, string>>} */ (TRANSITIONS)[state];
  return row?.[event] ?? null;
}

/**
 * Whether a failed submission's operation may have happened (or may still be running), so that the key must be
 * kept: no response at all, or a final status in {@link UNKNOWN_OUTCOME_STATUSES}.
 * @param {Response | null} response
 * @returns {boolean}
 */
export function outcomeUnknown(response) {
  return response === null || UNKNOWN_OUTCOME_STATUSES.includes(response.status);
}

/**
 * @typedef {"success" | "failed" | "unconfirmed" | "unknown" | "not-stored"} OutcomeKind  How a submission ended:
 * - `success`: a 2xx.
 * - `unknown`: the server said that it does not know whether the operation happened (a 503 outcome-unknown
 *   problem): it may have. The key is kept, and every retry gets the same answer until the service resolves it,
 *   so tell the user not to do it again another way (not to pay again), rather than that it failed.
 * - `not-stored`: the server said that the operation was done, but that its response was not kept (a 410
 *   response-not-stored problem, e.g. after an operator resolved an unknown outcome as done). The key is kept,
 *   so submitting again can never do it a second time.
 * - `unconfirmed`: no final answer (no response, or a final 409, 502, 503 or 504; see {@link outcomeUnknown}): it
 *   may have happened or may still be running. The key is kept: submitting again is a safe retry.
 * - `failed`: a definite answer that it did not happen (any other status): a new key.
 */

/**
 * @typedef {object} Outcome  What the success and error messages, `redirect` and the events are given.
 * @property {string | null} key  The key the submission was sent with.
 * @property {Response | null} response  The final response, `null` if there was none.
 * @property {unknown} body  The response's body: parsed JSON if it is JSON, else text; `null` without response.
 * @property {object | null} problem  The body when it is an RFC 9457 problem document (`application/problem+json`).
 * @property {unknown} error  The error, when there was no response.
 * @property {OutcomeKind} outcome  How it ended.
 * @property {boolean} unknown  Whether the page cannot know if the operation happened (`outcome` is `unconfirmed`
 *   or `unknown`; see {@link outcomeUnknown}).
 */

/**
 * @typedef {object} SubmitOptions
 * @property {(target: Element) => {url: RequestInfo | URL, init?: RequestInit}} [request]  Builds the request.
 *   For a form, by default: its `action`, its `method` (POST unless it says otherwise), and its fields as FormData.
 * @property {Element | null} [button]  The button to disable: the target itself if it is a button, else the
 *   form's first submit button.
 * @property {Element | null} [status]  Where messages are written (give it `role="status"`).
 * @property {string | ((outcome: Outcome) => string)} [successMessage="Done."]
 * @property {(outcome: Outcome) => string} [errorMessage]  By default (see {@link defaultErrorMessage}) the
 *   problem document's title and detail, or the status; when the outcome is unconfirmed, that trying again is safe;
 *   when the server said it is unknown, that it may have been done and must not be done again another way.
 * @property {string | ((outcome: Outcome) => string | null)} [redirect]  Where to go after a success.
 * @property {boolean} [again=false]  Allow another submission after a success (with a new key); by default the
 *   button stays disabled after a success, as for a payment.
 * @property {"unknown-keeps" | "always"} [rekey="unknown-keeps"]  After a failure, a new key is generated unless the
 *   operation may have happened (`outcome` `unconfirmed`, `unknown` or `not-stored`: then submitting again is a
 *   safe retry of the same operation, never a second one). `"always"` generates one after every failure except
 *   where the server itself said that the operation may have happened or did (`unknown`, `not-stored`).
 * @property {FetchOptions} [fetchOptions]  Passed on to {@link idempotentFetch} (attempts, timeout, ...).
 * @property {(location: string) => void} [navigate]  For tests: how to follow `redirect`.
 */

/**
 * A form or a button bound to the submit state machine. Dispatches, as `CustomEvent`s with their `detail`:
 *
 * - `statechange` `{state, previous, key}`; the target's `data-idempo-state` attribute follows the state too;
 * - `key` `{key}` whenever the current key changes;
 * - `attempt` (an {@link AttemptInfo}) before each attempt, and `result` (a {@link ResultInfo}) after it;
 * - `success` and `fail` (an {@link Outcome}) when a submission ends; `detail.outcome` says how (for a FAIL,
 *   `"unknown"` is the server saying it does not know whether the operation happened: "we don't know whether your
 *   payment went through; don't pay again").
 */
export class SubmitController extends EventTarget {
  /**
   * Use {@link idempotentSubmit}.
   * @param {Element} target
   * @param {SubmitOptions} options
   */
  constructor(target, options) {
    super();
    this.target = target;
    this.options = options;
    /** @type {Element | null} */
    this.button =
      options.button ?? (isButton(target) ? target : target.querySelector?.('[type="submit"], button:not([type])') ?? null);
    /** @type {string} */
    this.state = State.READY;
    /** @type {string} */
    this.key = newKey();
    /** @type {AbortController | null} */
    this._inFlight = null;
    this._listener = (/** @type {Event} */ event) => {
      event.preventDefault();
      void this.submit();
    };
    this._eventName = isForm(target) ? "submit" : "click";
    target.addEventListener(this._eventName, this._listener);
    this._render(null);
  }

  /**
   * Submit now, as a click would. Resolves when the submission ends (`true` for a success), or at once with
   * `false` when the current state takes no submission (while SUBMITTING, or after a success without `again`).
   * @returns {Promise<boolean>}
   */
  async submit() {
    if (this.state === State.SUCCESS && !this.options.again) return false;
    if (nextState(this.state, "submit") === null) return false;
    // Built before the state changes: should the builder throw (a bug), the form stays usable.
    const built = (this.options.request ?? defaultRequest)(this.target);
    this._go("submit");
    const key = this.key;
    const fetchOptions = this.options.fetchOptions ?? {};
    this._inFlight = new AbortController();
    /** @type {Response | null} */
    let response = null;
    let error = null;
    try {
      response = await idempotentFetch(built.url, built.init ?? {}, {
        ...fetchOptions,
        key,
        signal: anySignal([fetchOptions.signal, this._inFlight.signal]),
        onAttempt: (info) => {
          fetchOptions.onAttempt?.(info);
          this._emit("attempt", info);
        },
        onResult: (info) => {
          fetchOptions.onResult?.(info);
          this._emit("result", info);
        },
      });
    } catch (caught) {
      error = caught;
    } finally {
      this._inFlight = null;
    }
    const ok = response !== null && response.ok;
    const body = response === null ? null : await readBody(response);
    const problem =
      response !== null && isProblemType(response.headers.get("Content-Type")) && isObject(body) ? body : null;
    const kind = outcomeKind(response, problem);
    /** @type {Outcome} */
    const outcome = {
      key,
      response,
      body,
      problem,
      error,
      outcome: kind,
      unknown: kind === "unconfirmed" || kind === "unknown",
    };
    if (ok) {
      this._go("succeed");
      this._message(resolveText(this.options.successMessage ?? "Done.", outcome) ?? "", "success");
      if (this.options.again) this._setKey(newKey());
      this._emit("success", outcome);
      const target = resolveText(this.options.redirect ?? null, outcome);
      if (target) (this.options.navigate ?? ((url) => globalThis.location.assign(url)))(target);
    } else {
      this._go("fail");
      this._message((this.options.errorMessage ?? defaultErrorMessage)(outcome), "error");
      if (kind === "failed" || (kind === "unconfirmed" && this.options.rekey === "always")) this._setKey(newKey());
      this._emit("fail", outcome);
    }
    return ok;
  }

  /**
   * Send the next submission with *key* instead of the current one: to resume an operation whose outcome was
   * unknown from another page, say. Ignored while SUBMITTING.
   * @param {string} key
   * @returns {boolean} whether the key was taken
   */
  useKey(key) {
    if (this.state === State.SUBMITTING) return false;
    this._setKey(key);
    return true;
  }

  /** Back to READY with a new key and no message, from SUCCESS or FAIL. */
  reset() {
    if (this._go("reset")) {
      this._setKey(newKey());
      this._message("", null);
    }
  }

  /** Abort the submission in flight (it then FAILs with its outcome unknown, so the key is kept). */
  abort() {
    this._inFlight?.abort(new DOMException("the submission was aborted", "AbortError"));
  }

  /** Stop listening to the target. An in-flight submission still ends. */
  destroy() {
    this.target.removeEventListener(this._eventName, this._listener);
  }

  /** @param {string} event @returns {boolean} */
  _go(event) {
    const next = nextState(this.state, event);
    if (next === null) return false;
    const previous = this.state;
    this.state = next;
    this._render(previous);
    return true;
  }

  /** @param {string | null} previous */
  _render(previous) {
    this.target.setAttribute("data-idempo-state", this.state);
    const busy = this.state === State.SUBMITTING;
    const locked = busy || (this.state === State.SUCCESS && !this.options.again);
    if (this.button !== null) {
      /** @type {HTMLButtonElement} */ (this.button).disabled = locked;
      if (busy) this.button.setAttribute("aria-busy", "true");
      else this.button.removeAttribute("aria-busy");
    }
    if (previous !== null) this._emit("statechange", { state: this.state, previous, key: this.key });
  }

  /** @param {string} key */
  _setKey(key) {
    this.key = key;
    this._emit("key", { key });
  }

  /** @param {string} text @param {"success" | "error" | null} kind */
  _message(text, kind) {
    const status = this.options.status;
    if (!status) return;
    status.textContent = text;
    if (kind === null) status.removeAttribute("data-kind");
    else status.setAttribute("data-kind", kind);
  }

  /** @param {string} type @param {unknown} detail */
  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/**
 * Bind a form (on `submit`) or a button (on `click`) to the submit state machine, and return its controller.
 *
 * The key is generated at once (READY). A submission disables the button and sets `aria-busy="true"` on it
 * (style a spinner with `[aria-busy="true"]`), and sends the request with {@link idempotentFetch}, whose retries
 * reuse the key. A 2xx is SUCCESS: `successMessage` is shown, and `redirect` followed. Anything else is FAIL: the
 * error is shown, the button enabled again, and a new key generated, except when the operation may have happened
 * (no response, a final 409, 502, 503 or 504, the server's 503 outcome-unknown, or its 410 response-not-stored):
 * then the key is kept, so that submitting again can only replay or finish the same operation, never run a second
 * one. The `fail` event's `detail.outcome` tells these cases apart ({@link OutcomeKind}).
 *
 * @param {Element} target  A `<form>`, or a button.
 * @param {SubmitOptions} [options]
 * @returns {SubmitController}
 */
export function idempotentSubmit(target, options = {}) {
  return new SubmitController(target, options);
}

/** @param {Element} element */
function isForm(element) {
  return element.tagName === "FORM";
}

/** @param {Element} element */
function isButton(element) {
  return element.tagName === "BUTTON" || (element.tagName === "INPUT" && element.getAttribute("type") === "submit");
}

/** @param {Element} target @returns {{url: string, init: RequestInit}} */
function defaultRequest(target) {
  if (!isForm(target)) throw new TypeError("idempotentSubmit needs options.request for a target that is not a form");
  const form = /** @type {HTMLFormElement} */ (target);
  const method = (form.getAttribute("method") ?? "POST").toUpperCase();
  return { url: form.action, init: { method: method === "GET" ? "POST" : method, body: new FormData(form) } };
}

/** @param {unknown} value @returns {value is object} */
function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

/**
 * How a submission that got *response* (or none) ended; *problem* is its parsed problem document, if any.
 * @param {Response | null} response
 * @param {object | null} problem
 * @returns {OutcomeKind}
 */
function outcomeKind(response, problem) {
  if (response !== null && response.ok) return "success";
  if (response !== null && isOutcomeUnknownProblem(response.status, problem)) return "unknown";
  if (response !== null && response.status === 410 && isNotStoredProblem(problem)) return "not-stored";
  return outcomeUnknown(response) ? "unconfirmed" : "failed";
}

/** @param {object | null} problem @returns {boolean} */
function isNotStoredProblem(problem) {
  const type = /** @type {{type?: unknown} | null} */ (problem)?.type;
  return typeof type === "string" && type.endsWith("response-not-stored");
}

/** @param {Response} response @returns {Promise<unknown>} */
async function readBody(response) {
  let text;
  try {
    text = await response.text();
  } catch {
    return null;
  }
  if (/\bjson\b/.test(response.headers.get("Content-Type") ?? "")) {
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }
  return text;
}

/**
 * @param {string | null | ((outcome: Outcome) => string | null)} value
 * @param {Outcome} outcome
 * @returns {string | null}
 */
function resolveText(value, outcome) {
  return typeof value === "function" ? value(outcome) : value;
}

/**
 * The default error message: what the server said (an RFC 9457 problem's title and detail, or the status), or,
 * when the outcome is unconfirmed, that trying again is safe. When the server said that it does not know whether the
 * operation happened, or that it happened without its response being kept, it says that instead of any detail.
 * @param {Outcome} outcome
 * @returns {string}
 */
export function defaultErrorMessage(outcome) {
  const { response, body } = outcome;
  if (outcome.outcome === "unknown") {
    return "We don't know whether this went through: it may have been done. Don't do it again; check its status later.";
  }
  if (outcome.outcome === "not-stored") {
    const status = /** @type {{original_status?: unknown}} */ (outcome.problem ?? {}).original_status;
    const what = typeof status === "number" && status > 0 ? ` (status ${status})` : "";
    return `This was already done${what}, but its result cannot be shown again. It will not be done twice.`;
  }
  const unknown = outcome.outcome === "unconfirmed";
  const again = "Trying again is safe: it will not be done twice.";
  if (response === null) {
    const what = outcome.error instanceof DOMException && outcome.error.name === "TimeoutError" ? "no answer in time" : "the network failed";
    return `Could not confirm the result (${what}). ${again}`;
  }
  let text = `${response.status} ${response.statusText}`.trim();
  if (body && typeof body === "object") {
    const problem = /** @type {{title?: unknown, detail?: unknown}} */ (body);
    const parts = [problem.title, problem.detail].filter((p) => typeof p === "string" && p);
    if (parts.length) text = `${response.status}: ${parts.join(": ")}`;
  }
  return unknown ? `${text}. ${again}` : text;
}
