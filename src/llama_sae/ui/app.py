"""``llama-sae ui``: a browser chat with the model, its features and steering (Gradio, the ``ui`` extra).

Chat and text completion, streamed, with sampling controls; steering slots (latent, kind, strength slider,
positions) that build the same specs as ``--steer``; a feature search by explanation text or latent id;
for the last reply, the tokens coloured by their top latent (click a token: its top latents with
explanations; click a latent: it goes into the first steering slot); steered and unsteered output side by
side; the JSON record of the last generation (``llama-sae generate --replay`` runs it again).

The model and SAEs live in one :class:`Session`; one generation runs at a time (the splice hooks are
state on the model). Everything here except :func:`build_app` and :func:`launch` is plain Python, so the
tests drive it without a browser. (No ``from __future__ import annotations``: Gradio reads the handlers'
annotations, gr.SelectData and gr.Request, at build time.)
"""


import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from llama_sae.errors import UserError

N_SLOTS = 3
KIND_CHOICES = ["add", "clamp", "bias"]
POSITION_CHOICES = ["all", "prompt", "last", "generated"]
STRENGTH_RANGE = (-12.0, 12.0)


@dataclass
class Session:
    """A loaded model with its SAEs, features artifacts and steering units."""

    model: object
    tokenizer: object
    model_path: str
    saes: dict  # hook -> SAE
    sources: dict  # hook -> {"path", "units"}
    features: dict  # hook -> Features
    units: dict  # hook -> Tensor [d_sae]
    lock: threading.Lock = field(default_factory=threading.Lock)
    notes: list[str] = field(default_factory=list)

    @property
    def hook(self) -> str:
        return next(iter(self.saes))

    def steering(self, specs: list[str]):
        """A Steering for spec strings (None when there are none); UserError for bad ones."""
        from llama_sae.steer import Steering, parse_steers

        steers = parse_steers(specs)
        if not steers:
            return None
        return Steering(self.saes, steers, self.units, sources=self.sources)

    def explanation(self, latent: int, hook: str | None = None) -> str:
        f = self.features.get(hook or self.hook)
        e = None if f is None else f.explanation(latent)
        return "" if e is None else e.text

    def search(self, query: str, limit: int = 20) -> list[list]:
        """Rows [latent, explanation, detection, frequency] for an id or explanation text."""
        query = query.strip()
        f = self.features.get(self.hook)
        d_sae = self.saes[self.hook].cfg.d_sae
        if query.isdecimal():
            if int(query) >= d_sae:
                raise UserError(f"latent {query} is out of range: this SAE has latents 0..{d_sae - 1}")
            hits = [int(query)]
        elif f is None:
            raise UserError("no features artifact loaded, so there are no explanations to search: search by "
                            "latent id, or start the UI with --features DIR")
        else:
            hits = f.search(query, limit)
        rows = []
        for i in hits:
            e = None if f is None else f.explanation(i)
            rows.append([i, "" if e is None else e.text, None if e is None or e.detection is None else
                         round(e.detection, 3), None if f is None else round(float(f.frequency[i]), 5)])
        return rows

    def stream(self, prompt, steering, *, chat: bool, sampling: dict):
        """Yield (text so far, prompt tokens, new tokens) while generating one reply or completion."""
        from llama_sae.steer import generate

        tok = self.tokenizer
        prompt_tokens = tok.encode_chat(prompt) if chat else tok.encode(prompt)
        text, new = "", []
        with self.lock:
            for chunk in generate(self.model, tok, [prompt_tokens], steering, stream=True, **sampling):
                if chunk.token >= 0 and chunk.token not in tok.stop_ids:
                    new.append(chunk.token)
                text += chunk.text
                yield text, prompt_tokens, new

    def token_view(self, prompt_tokens: list[int], new_tokens: list[int], top: int = 5) -> list[dict]:
        """For each new token: {"token", "latents": [[latent, activation, explanation], ...]} (in context)."""
        from llama_sae.cli_steer import token_features

        if not new_tokens:
            return []
        with self.lock:
            rows = token_features(self.model, self.tokenizer, {self.hook: self.saes[self.hook]},
                                  prompt_tokens + new_tokens, top)[self.hook]
        return [{"token": text, "latents": [[i, round(v, 3), self.explanation(i)] for i, v in latents]}
                for text, latents in rows[-len(new_tokens):]]


def load_session(model: str | None = None, sae_paths: list[str] | None = None,
                 feature_paths: list[str] | None = None, device: str = "cpu") -> Session:
    """Load the model (default: the shipped tiny model) and SAEs (default: the shipped tinyworld SAE and its
    features artifact); units come from the artifacts, or a quick estimate."""
    from llama_sae import tinyworld
    from llama_sae.llama import load_model, load_tokenizer
    from llama_sae.steer import build_steering, load_saes, match_features

    notes, shipped = [], not sae_paths and not feature_paths  # the shipped SAE with its own artifact
    model_path = str(model or tinyworld.model_path())
    if not sae_paths:
        if model is not None:
            from llama_sae.llama.checkpoint import read_args

            read_args(model)  # a wrong path says so first
            raise UserError("--model without --sae: pass the SAE trained on that model with --sae PATH")
        sae_paths = [str(tinyworld.sae_path())]
        if not feature_paths and tinyworld.features_path().exists():
            feature_paths = [str(tinyworld.features_path())]
        notes.append(f"no --sae given: using the shipped tinyworld SAE {sae_paths[0]}")
    net, tok = load_model(model_path, device=device), load_tokenizer(model_path)
    saes, sources = load_saes(net, sae_paths)
    try:
        features = match_features(feature_paths or [], saes, sources)
    except UserError as e:
        if not shipped:
            raise
        features = {}  # an out-of-date shipped artifact: run without explanations rather than not at all
        notes.append(f"shipped features artifact not used ({e})")
    steering = build_steering(net, tok, saes, [], sources=sources, features=features)
    return Session(net, tok, model_path, saes, steering.sources, features, steering.units, notes=notes)


def slot_specs(values: list) -> list[str]:
    """Spec strings of the steering slots: values = [latent, kind, strength, positions] * N_SLOTS; a slot with
    no latent or zero strength is off (for clamp, zero strength is an edit: the slot needs a latent only)."""
    specs = []
    for j in range(0, len(values), 4):
        latent, kind, strength, positions = values[j:j + 4]
        latent = "" if latent is None else str(latent).strip()
        if not latent or (kind != "clamp" and not strength):
            continue
        if not latent.isdecimal():
            raise UserError(f"steering slot {j // 4 + 1}: latent {latent!r} is not a latent id (a whole number)")
        try:
            strength = float(strength or 0.0)
        except (TypeError, ValueError):
            raise UserError(f"steering slot {j // 4 + 1}: strength {strength!r} is not a number") from None
        specs.append(f"{int(latent)}:{kind}:{strength:g}:{positions}")
    return specs


def all_specs(extra: str, slots: list) -> list[str]:
    """The slots' specs plus any typed in the free-text box (comma or space separated)."""
    from llama_sae.steer import parse_steers

    return slot_specs(slots) + [s.spec for s in parse_steers(extra or "")]


def check_port(host: str, port: int) -> None:
    """UserError naming the fix when ``host:port`` cannot be served: a port out of range, an address that is not
    this machine's, or a port that is taken."""
    import errno

    if not 1 <= port <= 65535:
        raise UserError(f"port {port} is out of range: pass --port between 1 and 65535 (default 7860)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except socket.gaierror:
            raise UserError(f"{host!r} is not an address or host name: pass --host 127.0.0.1 (this machine only) or "
                            "0.0.0.0 (every interface)") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use (another llama-sae ui?): pass --port N, "
                                "or stop the other server") from None
            raise UserError(f"cannot serve on {host}:{port} ({e.strerror}): pass --host 127.0.0.1, or an address of "
                            "this machine") from None


def build_app(session: Session):
    """The Gradio Blocks app for ``session``."""
    import gradio as gr

    from llama_sae.steer import record

    def refusal(message: str) -> Exception:
        """A message for the user's mistake: shown in the page, with no traceback in the server's log."""
        return gr.Error(message, print_exception=False)

    def steering_or_error(extra, slots):
        try:
            steering = session.steering(all_specs(extra, list(slots)))
        except UserError as e:
            raise refusal(str(e)) from None
        for line in steering.warnings if steering else []:
            gr.Warning(line)
        return steering

    def sampling_of(max_new, temperature, top_p, seed):
        try:
            sampling = {"max_new_tokens": int(max_new), "temperature": float(temperature), "top_p": float(top_p),
                        "seed": None if seed in (None, "") else int(seed)}
        except (TypeError, ValueError, OverflowError):
            raise refusal("max new tokens, temperature, top-p and seed must be numbers") from None
        if sampling["seed"] is not None and not 0 <= sampling["seed"] < 2**63:
            raise refusal(f"seed {sampling['seed']} is out of range: use 0 to 2^63 - 1")
        if not 0 <= sampling["temperature"] <= 100 or not 0 < sampling["top_p"] <= 1:
            raise refusal("temperature must be in 0..100 (0 = greedy) and top-p in (0, 1]")
        return sampling

    def stream(prompt, steering, chat, sampling):
        """session.stream with its errors (a prompt past the context, ...) shown as the message they carry."""
        try:
            yield from session.stream(prompt, steering, chat=chat, sampling=sampling)
        except UserError as e:
            raise refusal(str(e)) from None

    def chat_fn(message, steered, plain, compare, extra, max_new, temperature, top_p, seed, *slots):
        message = (message or "").strip()
        if not message:
            raise refusal("type a message first")
        steering = steering_or_error(extra, slots)
        sampling = sampling_of(max_new, temperature, top_p, seed)
        history = [{"role": m["role"], "content": _text(m["content"])} for m in steered] + [
            {"role": "user", "content": message}]
        steered = history + [{"role": "assistant", "content": ""}]
        plain = [{**m, "content": _text(m["content"])} for m in plain]
        if compare:  # the unsteered column gets this turn only when it is generated; its user message keeps the
            # turn's number (the state's copy only), so Regenerate finds this turn there, or knows it is not there
            turn = sum(m["role"] == "user" for m in history) - 1
            plain += [{"role": "user", "content": message, "turn": turn}, {"role": "assistant", "content": ""}]
        item = ("", [], [])
        for item in stream(history, steering, True, sampling):
            steered[-1]["content"] = item[0]
            yield "", steered, _shown(plain), gr.skip(), gr.skip(), gr.skip(), steered, plain
        view = session.token_view(item[1], item[2])
        outputs = [steered[-1]["content"]]
        rec = json.dumps(record(steering, session.model_path, history, outputs, sampling, chat=True,
                                model=session.model), indent=1)
        yield "", steered, _shown(plain), _highlight(view), view, rec, steered, plain
        if compare:
            plain_history = [{"role": m["role"], "content": m["content"]} for m in plain[:-1]]
            for text, _, _ in stream(plain_history, None, True, sampling):
                plain[-1]["content"] = text
                yield "", steered, _shown(plain), gr.skip(), gr.skip(), gr.skip(), steered, plain

    def regenerate_fn(steered, plain, compare, extra, max_new, temperature, top_p, seed, *slots):
        users = [m for m in steered if m["role"] == "user"]
        if not users:
            yield gr.skip(), steered, plain, gr.skip(), gr.skip(), gr.skip(), steered, plain
            return
        last = _text(users[-1]["content"])
        cut_s = max(i for i, m in enumerate(steered) if m["role"] == "user")
        # the unsteered column holds this turn only if it was generated there (compare on when it was sent); with
        # compare off it stays as it is (steering does not change it), with compare on this turn is generated anew
        cut_p = len(plain) if not compare else next(
            (i for i, m in enumerate(plain) if m["role"] == "user" and m.get("turn") == len(users) - 1), len(plain))
        yield from chat_fn(last, steered[:cut_s], plain[:cut_p], compare, extra, max_new, temperature, top_p, seed,
                           *slots)

    def complete_fn(prompt, compare, extra, max_new, temperature, top_p, seed, *slots):
        if not (prompt or "").strip():
            raise refusal("type a prompt first")
        steering = steering_or_error(extra, slots)
        sampling = sampling_of(max_new, temperature, top_p, seed)
        item = ("", [], [])
        for item in stream(prompt, steering, False, sampling):
            yield item[0], gr.skip(), gr.skip(), gr.skip(), gr.skip()
        text = item[0]
        view = session.token_view(item[1], item[2])
        rec = json.dumps(record(steering, session.model_path, [prompt], [text], sampling, model=session.model),
                         indent=1)
        yield text, gr.skip(), _highlight(view), view, rec
        if compare:
            for plain_text, _, _ in stream(prompt, None, False, sampling):
                yield gr.skip(), plain_text, gr.skip(), gr.skip(), gr.skip()

    def token_select(view, evt: gr.SelectData):
        i = evt.index if isinstance(evt.index, int) else evt.index[0]
        if not view or i >= len(view):
            return gr.skip(), gr.skip()
        return f"**token {i}: `{view[i]['token']}`** (click a latent to steer it)", view[i]["latents"]

    def latent_select(evt: gr.SelectData):
        latent = evt.row_value[0] if evt.row_value else None
        if latent is None:
            return gr.skip(), gr.skip(), gr.skip()
        return str(int(latent)), "add", 8.0

    def search_fn(query):
        try:
            return session.search(query or "")
        except UserError as e:
            raise refusal(str(e)) from None

    def on_load(request: gr.Request):
        spec = (request.query_params or {}).get("steer") if request else None
        spec = spec and spec.strip().replace(" ", "+")  # a typed ?steer=...:last+2 arrives with "+" as a space
        if not spec:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            s = session.steering([spec]).steers[0]
        except UserError as e:
            gr.Warning(str(e))
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if s.hook != session.hook or s.positions not in POSITION_CHOICES or \
                not STRENGTH_RANGE[0] <= s.strength <= STRENGTH_RANGE[1]:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), s.spec  # the slot cannot hold it: the specs box can
        return str(s.latent), s.kind, s.strength, s.positions, gr.skip()

    sae = session.saes[session.hook]
    name = "tinyworld" if Path(session.model_path) == tinyworld_model() else Path(session.model_path).name
    title = (f"llama-sae: {name} with an SAE at {session.hook} "
             f"({sae.cfg.d_sae:,} latents, k = {sae.cfg.k})")
    with gr.Blocks(title="llama-sae") as app:
        gr.Markdown(f"### {title}\n" + "".join(f"\n_{n}_" for n in session.notes))
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("Chat"):
                    with gr.Row():
                        steered_chat = gr.Chatbot(label="steered", elem_id="steered-chat", height=320)
                        plain_chat = gr.Chatbot(label="unsteered", elem_id="plain-chat", height=320)
                    message = gr.Textbox(label="message", elem_id="chat-input", placeholder="Ask something...")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        regen = gr.Button("Regenerate", elem_id="regenerate")
                        clear = gr.Button("Clear", elem_id="clear")
                with gr.Tab("Completion"):
                    prompt = gr.Textbox(label="prompt", elem_id="prompt", value="The")
                    complete = gr.Button("Complete", variant="primary", elem_id="complete")
                    with gr.Row():
                        steered_text = gr.Textbox(label="steered", elem_id="steered-text", lines=4)
                        plain_text = gr.Textbox(label="unsteered", elem_id="plain-text", lines=4)
                gr.Markdown("#### features of the last output (click a token)")
                tokens = gr.HighlightedText(label="tokens, labelled by their top latent (the SAE's reading of the "
                                                  "residual stream, before any steering edit)", elem_id="token-view",
                                            combine_adjacent=False, show_legend=False)
                token_title = gr.Markdown(elem_id="token-title")
                token_latents = gr.Dataframe(headers=["latent", "activation", "explanation"], interactive=False,
                                             elem_id="token-latents", label="top latents of the token")
                with gr.Accordion("record of the last generation (llama-sae generate --replay FILE)", open=False):
                    rec = gr.Code(language="json", elem_id="record")
            with gr.Column(scale=2):
                gr.Markdown("#### steering (strength in units of the latent's typical max)")
                slots = []
                for j in range(N_SLOTS):
                    with gr.Group():
                        with gr.Row():
                            latent = gr.Textbox(label=f"latent {j + 1}", placeholder="id (empty: off)",
                                                elem_id=f"latent-{j}")
                            kind = gr.Dropdown(KIND_CHOICES, value="add", label="kind", elem_id=f"kind-{j}")
                            positions = gr.Dropdown(POSITION_CHOICES, value="prompt", label="positions",
                                                    elem_id=f"positions-{j}")
                        strength = gr.Slider(*STRENGTH_RANGE, value=0.0, step=0.5, label="strength",
                                             elem_id=f"strength-{j}")
                    slots += [latent, kind, strength, positions]
                extra = gr.Textbox(label="more steers (specs, e.g. 123:clamp:8 77:add:-3)", elem_id="specs")
                compare = gr.Checkbox(value=True, label="also generate unsteered (side by side)", elem_id="compare")
                with gr.Accordion("sampling", open=False):
                    max_new = gr.Slider(1, 256, value=32, step=1, label="max new tokens", elem_id="max-new")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p")
                    seed = gr.Number(value=0, precision=0, label="seed")
                gr.Markdown("#### feature search")
                query = gr.Textbox(label="explanation text or latent id", elem_id="search")
                results = gr.Dataframe(headers=["latent", "explanation", "detection", "frequency"],
                                       interactive=False, elem_id="search-results", label="click a row to steer it")
        settings = [compare, extra, max_new, temperature, top_p, seed, *slots]
        # the conversations as generated: a Chatbot's value comes back with a reply's leading space stripped
        steered_history, plain_history = gr.State([]), gr.State([])
        chat_out = [message, steered_chat, plain_chat, tokens, gr.State(), rec, steered_history, plain_history]
        view_state = chat_out[4]
        send.click(chat_fn, [message, steered_history, plain_history, *settings], chat_out)
        message.submit(chat_fn, [message, steered_history, plain_history, *settings], chat_out)
        regen_inputs = [steered_history, plain_history, *settings]
        regen.click(regenerate_fn, regen_inputs, chat_out)
        for j in range(N_SLOTS):  # moving a slider re-runs the last message with the new steering
            slots[4 * j + 2].release(regenerate_fn, regen_inputs, chat_out)
        clear.click(lambda: ([], [], [], None, "", [], []), None,
                    [steered_chat, plain_chat, tokens, view_state, rec, steered_history, plain_history])
        complete.click(complete_fn, [prompt, *settings], [steered_text, plain_text, tokens, view_state, rec])
        tokens.select(token_select, [view_state], [token_title, token_latents])
        tokens.change(lambda: ("", []), None, [token_title, token_latents])  # a new output: no stale token
        token_latents.select(latent_select, None, slots[:3])
        query.submit(search_fn, [query], [results])
        results.select(latent_select, None, slots[:3])
        app.load(on_load, None, [slots[0], slots[1], slots[2], slots[3], extra])
    return app


def tinyworld_model() -> Path:
    from llama_sae import tinyworld

    return tinyworld.model_path()


def _shown(messages: list[dict]) -> list[dict]:
    """What a Chatbot shows of a conversation: role and content (the state's copy keeps more)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _text(content) -> str:
    """A chat message's text (Gradio may hand back a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def _highlight(view: list[dict]) -> list[tuple[str, str | None]]:
    """HighlightedText value: each token with its top latent as the label (None when nothing fired)."""
    return [(v["token"], str(v["latents"][0][0]) if v["latents"] else None) for v in view]


def launch(session: Session, *, host: str = "127.0.0.1", port: int = 7860, open_browser: bool = False,
           block: bool = True):
    """Serve the app on host:port (UserError if the port is taken); returns the app when not blocking."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    check_port(host, port)
    app = build_app(session)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue().launch(server_name=host, server_port=port, inbrowser=open_browser, prevent_thread_lock=not block,
                       theme=theme, quiet=True, ssr_mode=False)
    return app
