"""
Serving: talk to a model from anywhere, through an OpenAI-compatible HTTP API and a web chat page.

    python serve.py config/notes.py                 # http://127.0.0.1:8000/ : the chat page
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "notes", "messages": [{"role": "user", "content": "who is mara?"}]}'

It serves the model sample.py would load (a checkpoint, a LoRA adapter, ckpt=base_model), with the
same prompts: chat.py builds them for both (the system prompt, retrieval from the notes when the
config has it, fitting to the context, the role tokens a reply never holds), so a reply equals
sample.py's for the same seed. Any OpenAI client works: base_url http://127.0.0.1:8000/v1.

    GET  /                      the chat page (serve.html: plain JavaScript, nothing from the web)
    GET  /v1/models             the one model served
    POST /v1/chat/completions   messages, max_tokens, temperature, top_p, stop, seed, stream
    POST /v1/completions        prompt, and the same settings

Why the standard library's http.server: it keeps the project free of a web framework, and the
whole server reads top to bottom in one file. It is enough for what one small model can serve:
one thread per connection, and one thread that runs the model (a model decodes one token at a
time anyway, and torch is happiest driven from one thread). That thread takes up to serve_slots
replies at once and gives each a token in turn, so a long reply never blocks a short one; more
requests wait in line (up to serve_max_waiting, then 429). A client that goes away stops its reply
at the next token. It is not a production server: put it behind a reverse proxy (TLS, many users),
or export to GGUF for llama.cpp's server (export.py).
"""
import codecs
import hmac
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from chat import banned_ids, chat_prompt, compile_decode, completion_prompt, reply_room
from checkpoint import load_configured
from common import die, runtime
from configurator import configure
from model import KVCache
from retrieval import notes_index
from tokenizer import check_roles, clean, load_tokenizer, system_prompt

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.html')
ROLES = ('system', 'user', 'assistant')


class BadRequest(Exception):
    """A request we refuse: its HTTP status and OpenAI's error fields."""

    def __init__(self, status, message, param=None, kind='invalid_request_error', code=None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code


# --- the model's thread: every reply in progress gets a token in turn ---

class Job:
    """One reply: its prompt and settings in, its tokens out (None after the last)."""

    def __init__(self, prompt, max_tokens, temperature, top_p, seed, stop_ids, banned, compiled):
        self.prompt, self.max_tokens, self.seed = prompt, max_tokens, seed
        self.temperature, self.top_p, self.compiled = temperature, top_p, compiled
        self.stop_ids, self.banned = stop_ids, banned
        self.tokens = queue.Queue()
        self.cancelled = threading.Event()  # set by the connection when its client went away
        self.error = None
        self.cache = self.steps = None  # the model thread's, while it runs


class Worker(threading.Thread):
    """The one thread that runs the model. Replies in progress each hold one of `slots` KV caches
    (made once: a compiled decode step keeps its buffers) and take a token in turn."""

    def __init__(self, cfg, model, autocast, slots, max_waiting):
        super().__init__(daemon=True)
        self.cfg, self.model, self.autocast = cfg, model, autocast
        self.device = model.embed.weight.device
        self.free = [KVCache(model) for _ in range(slots)]
        self.inbox = queue.Queue()
        self.max_waiting = max_waiting + slots
        self.pending = 0  # jobs in line or running
        self.lock = threading.Lock()  # (for pending: connections add, this thread takes away)
        self.stopping = False

    def submit(self, job):
        with self.lock:
            if self.pending >= self.max_waiting:
                raise BadRequest(429, f"the server is busy ({self.pending} requests in line): "
                                 "try again shortly", kind='rate_limit_error')
            self.pending += 1
        self.inbox.put(job)

    def start_job(self, job):
        job.cache = cache = self.free.pop()
        cache.reset()
        generator = torch.Generator(self.device).manual_seed(job.seed)
        job.steps = self.model.generate(job.prompt, job.max_tokens, job.temperature,
                                        self.cfg.top_k, job.top_p, banned=job.banned,
                                        stop=job.stop_ids, generator=generator, cache=cache,
                                        compile=job.compiled)
        return job

    def end_job(self, job, active):
        active.remove(job)
        if job.cache is not None:
            self.free.append(job.cache)
        if job.steps is not None:
            job.steps.close()
        job.tokens.put(None)
        with self.lock:
            self.pending -= 1

    def stop(self):
        """End every reply and the thread (before the interpreter exits: a thread stopped inside a
        torch op at exit can abort the process)."""
        self.stopping = True
        self.inbox.put(None)
        self.join(timeout=30)

    def run(self):
        active = []
        while not self.stopping:
            while self.free and (not active or not self.inbox.empty()):
                job = self.inbox.get()  # (waits here when idle)
                if job is None:  # stop() woke us
                    break
                try:
                    active.append(self.start_job(job))
                except Exception as e:  # noqa: BLE001
                    job.error = f"{type(e).__name__}: {e}"
                    self.end_job(job, [job])
            for job in active[:]:  # (a copy: finished jobs leave the list)
                if job.cancelled.is_set():
                    self.end_job(job, active)
                    continue
                try:
                    with self.autocast:
                        token = next(job.steps)
                except StopIteration:
                    self.end_job(job, active)
                    continue
                except Exception as e:  # noqa: BLE001 (one bad reply must not stop the server)
                    job.error = f"{type(e).__name__}: {e}"
                    self.end_job(job, active)
                    continue
                job.tokens.put(token)
        for job in active[:]:
            self.end_job(job, active)


class Reply:
    """A reply's ids -> its text, a piece at a time: whole characters only (a UTF-8 decoder across
    tokens), and text that might be the start of a stop string held back until it is not."""

    def __init__(self, tok, stop):
        self.tok, self.stop = tok, stop
        self.decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
        self.text, self.sent = '', 0
        self.stopped = False  # a stop string was written: the reply ends before it

    def add(self, token):
        self.text += self.decoder.decode(self.tok.id_bytes[token])
        return self.piece()

    def piece(self, final=False):
        if final:
            self.text += self.decoder.decode(b'', final=True)
        found = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped, end = True, min(found)
        elif final:
            end = len(self.text)
        else:  # hold back an end of the text that begins a stop string
            held = max([n for s in self.stop for n in range(1, len(s))
                        if self.text.endswith(s[:n])], default=0)
            end = len(self.text) - held
        piece, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return piece


# --- reading a request ---

def field(body, name, types, default, check=None, why=''):
    """body[name] when present (and not null), of one of `types`, passing `check`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        want = ' or '.join(t.__name__ for t in types)
        raise BadRequest(400, f"'{name}' must be {want}, got {type(value).__name__} "
                              f"{json.dumps(value)[:40]}", name)
    if check and not check(value):
        raise BadRequest(400, f"'{name}' is {value!r}: it must be {why}", name)
    return value


def sampling(body, cfg):
    """The settings every generating request shares; the config's are the defaults."""
    limit = cfg.serve_max_tokens
    max_tokens = field(body, 'max_tokens', (int,), None, lambda v: 1 <= v <= limit,
                       f"between 1 and {limit} (serve_max_tokens)")
    max_tokens = field(body, 'max_completion_tokens', (int,), max_tokens,
                       lambda v: 1 <= v <= limit, f"between 1 and {limit} (serve_max_tokens)")
    stop = field(body, 'stop', (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(400, "'stop' must be a string or a list of up to 4 non-empty strings",
                         'stop')
    field(body, 'n', (int,), 1, lambda v: v == 1, "1 (one reply per request)")
    for unsupported in ('logprobs', 'echo', 'tools', 'best_of'):
        if body.get(unsupported):
            raise BadRequest(400, f"'{unsupported}' is not supported by this server",
                             unsupported)
    options = field(body, 'stream_options', (dict,), {})
    return {
        'max_tokens': max_tokens or cfg.max_new_tokens,
        'temperature': float(field(body, 'temperature', (int, float), cfg.temperature,
                                   lambda v: 0 <= v <= 2, "between 0 and 2")),
        'top_p': float(field(body, 'top_p', (int, float), cfg.top_p, lambda v: 0 < v <= 1,
                             "more than 0 and at most 1")),
        'seed': field(body, 'seed', (int,), None, lambda v: 0 <= v < 2 ** 63,
                      "a non-negative integer"),
        'stop': [clean(s) for s in stop],
        'stream': field(body, 'stream', (bool,), False),
        'usage_chunk': bool(options.get('include_usage')),
    }


def text_of(content, where):
    """A message's content: a string, or OpenAI's list of parts, of which only text is read."""
    if isinstance(content, str):
        return clean(content)
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get('type') == 'text' and isinstance(p.get('text'), str) for p in content):
            return clean(''.join(p['text'] for p in content))
        raise BadRequest(400, f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are "
                              "supported", 'messages')
    raise BadRequest(400, f"{where}: 'content' must be a string or a list of text parts, got "
                          f"{type(content).__name__}", 'messages')


def conversation(body, cfg, configured):
    """The request's messages as the chat template takes them: the system prompt first (the
    config's when the request brings none; several are joined), then user and assistant taking
    turns (a run of one role's messages joined), ending with the user's."""
    messages = field(body, 'messages', (list,), None)
    if not messages:
        raise BadRequest(400, "'messages' must be a non-empty list of {role, content} messages",
                         'messages')
    if len(messages) > cfg.serve_max_messages:
        raise BadRequest(400, f"{len(messages)} messages: at most {cfg.serve_max_messages} "
                              "(serve_max_messages)", 'messages')
    system, turns = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(400, f"{where} must be an object with 'role' and 'content'",
                             'messages')
        role = m.get('role')
        if role not in ROLES:
            raise BadRequest(400, f"{where}: role {role!r} is not one of {', '.join(ROLES)}",
                             'messages')
        content = text_of(m.get('content'), where)
        if role == 'system':
            if turns:
                raise BadRequest(400, f"{where}: a system message must come before the others",
                                 'messages')
            system.append(content)
        elif turns and turns[-1]['role'] == role:
            turns[-1]['content'] += '\n\n' + content
        else:
            turns.append({'role': role, 'content': content})
    if not turns or turns[-1]['role'] != 'user':
        raise BadRequest(400, "the last message must be the user's (the reply is the "
                              "assistant's)", 'messages')
    if turns[0]['role'] != 'user':
        turns = turns[1:]  # (a reply with no question: the template starts with the user)
    out = [{'role': 'system', 'content': '\n\n'.join(system) if system else configured}] + turns
    if sum(len(m['content']) for m in out) > cfg.serve_max_chars:
        raise BadRequest(400, f"the messages hold more than {cfg.serve_max_chars:,} characters "
                              "(serve_max_chars)", 'messages', code='context_length_exceeded')
    check_roles(out)
    return out


# --- the HTTP side ---

class Handler(BaseHTTPRequestHandler):
    server_version = 'smallchat'
    timeout = 60  # a client that stops sending its request is dropped after this many seconds

    def log_message(self, format, *args):  # one line per request, on stderr
        print(f"{self.address_string()} {format % args}", file=sys.stderr)

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, e):
        self.send_json(e.status, {'error': {'message': str(e), 'type': e.kind, 'param': e.param,
                                            'code': e.code}})

    def authorized(self):
        key = self.server.cfg.api_key
        given = self.headers.get('Authorization', '')
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise BadRequest(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                             code='invalid_api_key')

    def do_GET(self):
        try:
            path = self.path.split('?')[0]
            if path in ('/', '/index.html'):
                with open(PAGE, 'rb') as f:
                    page = f.read()
                self.send_response(200)
                self.send_header('Content-Type', 'text/html; charset=utf-8')
                self.send_header('Content-Length', str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return
            if path == '/v1/models':
                self.authorized()
                self.send_json(200, {'object': 'list', 'data': [self.server.model_card]})
                return
            raise BadRequest(404, f"no such page: {path} (the API is under /v1; the chat page is "
                                  "/)", code='not_found')
        except BadRequest as e:
            self.send_error_json(e)

    def do_POST(self):
        try:
            path = self.path.split('?')[0]
            if path not in ('/v1/chat/completions', '/v1/completions'):
                raise BadRequest(404, f"no such endpoint: POST {path}", code='not_found')
            self.authorized()
            body = self.read_body()
            self.generate(body, chat=path == '/v1/chat/completions')
        except BadRequest as e:
            self.send_error_json(e)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away while we answered it
        except Exception as e:  # noqa: BLE001 (a bug of ours: said to the client, logged, and on)
            traceback.print_exc()
            self.send_error_json(BadRequest(500, f"internal error: {type(e).__name__}: {e}",
                                            kind='server_error'))

    def read_body(self):
        length = self.headers.get('Content-Length')
        if length is None or not length.isdigit():
            raise BadRequest(411, "send the body with a Content-Length header")
        if int(length) > self.server.cfg.serve_max_body:
            raise BadRequest(413, f"the body is {int(length):,} bytes: at most "
                                  f"{self.server.cfg.serve_max_body:,} (serve_max_body)")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        return body

    def generate(self, body, chat):
        srv = self.server
        model_name = field(body, 'model', (str,), srv.name)
        if model_name not in (srv.name, ''):
            raise BadRequest(404, f"model {model_name!r} is not served here: this server serves "
                                  f"{srv.name!r}", 'model', code='model_not_found')
        settings = sampling(body, srv.cfg)
        tok, block = srv.tok, srv.model.cfg.block_size
        if chat:
            messages = conversation(body, srv.cfg, srv.system)
            # as the terminal chat: a reply gets at most half the context
            settings['max_tokens'] = reply_room(settings['max_tokens'], block)
            _, prompt = chat_prompt(tok, messages, block, settings['max_tokens'], srv.notes,
                                    srv.cfg.retrieve_k, say=self.note)
            stop_ids, banned = {tok.eot_id}, srv.banned
        else:
            text = field(body, 'prompt', (str, list), None)
            if isinstance(text, list):  # OpenAI allows a batch of prompts; we answer one
                if len(text) != 1 or not isinstance(text[0], str):
                    raise BadRequest(400, "'prompt' must be a string (or a list of one)", 'prompt')
                text = text[0]
            if text is None or len(text) > srv.cfg.serve_max_chars:
                raise BadRequest(400, "'prompt' must be a string of at most "
                                      f"{srv.cfg.serve_max_chars:,} characters", 'prompt')
            prompt = completion_prompt(tok, clean(text), block, settings['max_tokens'],
                                       say=self.note)
            stop_ids, banned = {tok.bos_id, tok.eos_id}, srv.banned_text
        seed = settings['seed']
        seed = int.from_bytes(os.urandom(8), 'little') >> 1 if seed is None else seed
        # the decode step is compiled (compile_decode) for the config's sampling settings and the
        # chat's banned tokens: a graph specializes on them, and another compile would hold up
        # every reply for as long as the first (~100 s for SmolLM2 on 2 cores). Other settings
        # decode eagerly (2-3x slower per token, at once)
        compiled = (srv.cfg.compile_decode and chat and settings['top_p'] == srv.cfg.top_p
                    and settings['temperature'] == srv.cfg.temperature)
        job = Job(prompt, settings['max_tokens'], settings['temperature'], settings['top_p'],
                  seed, stop_ids, banned, compiled)
        srv.worker.submit(job)
        try:
            self.answer(job, settings, chat, len(prompt))
        finally:
            job.cancelled.set()  # (a reply not finished when we stop answering: stop it)

    def note(self, text):
        print(f"({text})", file=sys.stderr)

    def client_gone(self):
        """Has the client closed its connection? (It sends nothing more after its request, so a
        readable socket means the end of it.)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b''
        except OSError:
            return True

    def tokens(self, job):
        """The reply's ids as the model thread makes them; stops it if the client goes away."""
        while True:
            try:
                token = job.tokens.get(timeout=0.5)
            except queue.Empty:
                if self.client_gone():
                    job.cancelled.set()
                    raise BrokenPipeError from None
                continue
            if token is None:
                if job.error:
                    raise BadRequest(500, f"generation failed: {job.error}", kind='server_error')
                return
            if self.client_gone():
                job.cancelled.set()
                raise BrokenPipeError
            yield token

    def answer(self, job, settings, chat, prompt_tokens):
        srv, t0 = self.server, time.time()
        reply = Reply(srv.tok, settings['stop'])
        kind = 'chat.completion' if chat else 'text_completion'
        head = {'id': f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                'object': kind, 'created': int(t0), 'model': srv.name}
        n, first, pieces, finish = 0, None, [], 'length'

        def choice(text, finish):
            if chat and settings['stream']:
                return {'index': 0, 'delta': {'content': text} if text else {},
                        'finish_reason': finish}
            if chat:
                return {'index': 0, 'message': {'role': 'assistant', 'content': text},
                        'finish_reason': finish}
            return {'index': 0, 'text': text, 'logprobs': None, 'finish_reason': finish}

        if settings['stream']:
            self.send_response(200)
            self.send_header('Content-Type', 'text/event-stream')
            self.send_header('Cache-Control', 'no-cache')
            self.end_headers()  # (no length: HTTP/1.0, the stream ends when the connection does)
            if chat:
                self.event({**head, 'object': 'chat.completion.chunk', 'choices': [
                    {'index': 0, 'delta': {'role': 'assistant', 'content': ''},
                     'finish_reason': None}]})
        try:
            for token in self.tokens(job):
                n += 1
                first = first or time.time()
                if token in job.stop_ids:  # the model ended its reply
                    finish = 'stop'
                    break
                piece = reply.add(token)
                if settings['stream'] and piece:
                    self.event({**head, 'object': kind + ('.chunk' if chat else ''),
                                'choices': [choice(piece, None)]})
                pieces.append(piece)
                if reply.stopped:  # it wrote one of the request's stop strings
                    finish = 'stop'
                    break
            last = '' if reply.stopped else reply.piece(final=True)
            finish = 'stop' if reply.stopped else finish
            pieces.append(last)
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()
            print(f"the client went away after {n} tokens: its reply stopped", file=sys.stderr)
            return
        except BadRequest as e:  # the model failed: said in the stream, or as the answer
            if not settings['stream']:
                raise
            self.event({'error': {'message': str(e), 'type': e.kind, 'param': None, 'code': None}})
            return
        job.cancelled.set()
        usage = {'prompt_tokens': prompt_tokens, 'completion_tokens': n,
                 'total_tokens': prompt_tokens + n}
        dt = time.time() - t0
        print(f"{'chat' if chat else 'completion'}: {prompt_tokens} prompt tokens, {n} generated "
              f"in {dt:.1f} s (first after {(first or time.time()) - t0:.2f} s), {finish}",
              file=sys.stderr)
        if settings['stream']:
            self.event({**head, 'object': kind + ('.chunk' if chat else ''),
                        'choices': [choice(last, finish)]})
            if settings['usage_chunk']:
                self.event({**head, 'object': kind + ('.chunk' if chat else ''), 'choices': [],
                            'usage': usage})
            self.wfile.write(b'data: [DONE]\n\n')
            return
        self.send_json(200, {**head, 'choices': [choice(''.join(pieces), finish)],
                             'usage': usage})

    def event(self, obj):
        self.wfile.write(b'data: ' + json.dumps(obj).encode() + b'\n\n')
        self.wfile.flush()


def main():
    cfg = configure()
    device, _, _, autocast = runtime(cfg.device, cfg.dtype)
    tok = load_tokenizer(cfg.tokenizer_path)
    model, _, path = load_configured(cfg, tok, device)
    notes = notes_index(cfg)
    system = system_prompt(cfg)
    banned = banned_ids(tok, model, cfg.allow_special)
    compile_decode(cfg, model, autocast, KVCache(model), banned)
    try:
        server = ThreadingHTTPServer((cfg.host, cfg.port), Handler)
    except OSError as e:
        die(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}): choose another --port (0 = "
            "any free one) or --host")
    server.daemon_threads = True
    name = os.path.basename(os.path.normpath(cfg.out_dir)) or 'smallchat'
    server.cfg, server.tok, server.model, server.notes = cfg, tok, model, notes
    server.system, server.banned = system, banned
    server.banned_text = banned_ids(tok, model, allow_special=True)  # (completions: plain text)
    server.name = name
    server.model_card = {'id': name, 'object': 'model', 'created': int(os.path.getmtime(path))
                         if os.path.exists(path) else 0, 'owned_by': 'smallchat',
                         'context_length': model.cfg.block_size, 'system_prompt': system,
                         'checkpoint': path, 'retrieval': bool(notes)}
    server.worker = Worker(cfg, model, autocast, cfg.serve_slots, cfg.serve_max_waiting)
    server.worker.start()

    def stop(signum, frame):  # SIGTERM as Ctrl-C: out of serve_forever, then close
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    host, port = server.server_address[:2]
    print(f"serving {name} ({path}) on http://{host}:{port}/  (API: http://{host}:{port}/v1"
          f"{', key required' if cfg.api_key else ''}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.worker.stop()
    server.server_close()
    print("server stopped", flush=True)


if __name__ == '__main__':
    main()
