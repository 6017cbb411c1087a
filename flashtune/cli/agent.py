"""`flashtune agent`: run a UI-TARS agent, evaluate grounding, parse answers, serve a scripted fake model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from flashtune.agent.coords import MAX_PIXELS, MIN_PIXELS, check_pixels
from flashtune.errors import ConfigError, check_range


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1280x720") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return w, h


def _check_model_args(args) -> None:
    """The model options that are wrong in themselves: one line naming the option, before anything starts."""
    check_pixels(args.min_pixels, args.max_pixels, names=("--min-pixels", "--max-pixels"))


def _default_out() -> str:
    """agent_runs/<time>, with -2, -3 ... when a run of the same second has it."""
    base = os.path.join("agent_runs", time.strftime("%Y%m%d-%H%M%S"))
    out, n = base, 1
    while os.path.exists(out):
        n += 1
        out = f"{base}-{n}"
    return out


def _client(args):
    from flashtune.agent.client import ChatClient, Sampling

    return ChatClient(args.endpoint, model=args.model, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
                      timeout=args.timeout, retries=args.retries,
                      sampling=Sampling(temperature=args.temperature, max_tokens=args.max_tokens))


def _add_model_args(p) -> None:
    p.add_argument("--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="ui-tars", help="model name sent in each request (default: ui-tars)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY, if set)")
    p.add_argument("--model-version", default="1.5", choices=["1.5", "1.0", "doubao"],
                   help="coordinate system: 1.5 = pixels of the smart-resized image; 1.0 / doubao = 0-1000")
    p.add_argument("--min-pixels", type=int, default=MIN_PIXELS,
                   help=f"the server processor's min_pixels (default {MIN_PIXELS} = 100*28*28)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"the server processor's max_pixels (default {MAX_PIXELS} = 16384*28*28); a mismatch "
                        "shifts every 1.5 click")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--retries", type=int, default=3, help="retries after 5xx/429/timeouts (default 3)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=1000)


def cmd_run(args) -> int:
    from flashtune.agent.loop import AgentConfig, check_new_run_dir, record_failed_start, run_agent

    from flashtune.fileio import output_dir

    # bad options: one line, nothing started, nothing written
    if args.display is not None and args.executor != "x11":
        raise ConfigError(f"--display {args.display} is for --executor x11; drop it, or add --executor x11")
    check_range("--scale-factor", args.scale_factor, 0, low_open=True)
    check_range("--startup-seconds", args.startup_seconds, 0, low_open=True)
    _check_model_args(args)
    config = AgentConfig(max_steps=args.max_steps, model_version=args.model_version, template=args.template,
                         language=args.language, wait_seconds=args.wait_seconds,
                         min_pixels=args.min_pixels, max_pixels=args.max_pixels, resamples=args.answer_retries,
                         stuck_after=args.stuck_after, start_url=args.start_url,
                         allow_hosts=tuple(args.allow_host or ()), max_type_chars=args.max_type_chars)
    client = _client(args)
    out = args.out or _default_out()
    check_new_run_dir(out)  # a run there already: its files stay
    output_dir(out)  # a file in the way, a read-only place: one line before Chromium or Xvfb starts
    closers = []
    try:
        try:
            executor = _launch(args, config, closers)
        except (Exception, KeyboardInterrupt) as exc:  # Chromium or Xvfb missing, a start URL that did not load
            error = record_failed_start(args.task, out, exc, config, executor_name=args.executor)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise error from None
        sandbox = executor.sandbox
        if sandbox is not None and not sandbox["enabled"]:
            print(f"note: Chromium runs without its sandbox: {sandbox['reason']}", file=sys.stderr)
        record = run_agent(args.task, client, executor, out, config, executor_name=args.executor)
    finally:
        for close in reversed(closers):
            close()
    print(f"status: {record['status']} after {len(record['steps'])} step(s)")
    if record.get("answer"):
        print(f"answer: {record['answer']}")
    print(f"report: {os.path.join(out, 'report.html')}")
    if record["status"] == "endpoint_error":  # the --endpoint the user gave: one line, exit 2
        print(f"flashtune: error: the model endpoint failed: {record.get('error', '')}", file=sys.stderr)
        return 2
    return 0 if record["status"] == "finished" else 1


def _launch(args, config, closers: list):
    """The executor for `args`, with what must be closed after the run appended to `closers`."""
    width, height = args.size
    if args.executor == "browser":
        from flashtune.agent.executors.browser import BrowserExecutor

        executor = BrowserExecutor.launch(args.start_url, width, height, scale_factor=args.scale_factor,
                                          policy=config.policy())
        closers.append(executor.close)
        return executor
    from flashtune.agent.executors.x11 import ChromiumWindow, VirtualDisplay, X11Executor, check_start_url

    if args.start_url:  # before any display starts: an address that does not load is one line
        check_start_url(args.start_url, policy=config.policy())
    display, sandbox, blocked = args.display, None, []
    if display is None:
        vd = VirtualDisplay(width, height)
        closers.append(vd.stop)
        display = vd.display
    executor = X11Executor(display)  # a --display with no X server behind it: one line, no window started
    if args.start_url:
        window = ChromiumWindow(display, args.start_url, width, height, policy=config.policy())
        closers.append(window.close)
        window.wait_until_drawn(args.startup_seconds)
        sandbox, blocked = window.sandbox, window.blocked
    executor.sandbox, executor.blocked = sandbox, blocked
    return executor


def cmd_ground(args) -> int:
    from flashtune.agent.grounding import evaluate, image_sizes, load_samples
    from flashtune.agent.prompts import grounding_messages
    from flashtune.fileio import output_file

    # everything that can be refused is, before the first request: the options, the data, every image, --out
    if args.limit is not None:
        check_range("--limit", args.limit, 1, integer=True)
    _check_model_args(args)
    samples = load_samples(args.data, args.images, args.bbox_format)
    if args.limit is not None:
        samples = samples[: args.limit]
    sizes = image_sizes(samples)
    if args.out:
        output_file(args.out)
    client = _client(args)

    def answer(sample):
        with open(sample.image, "rb") as f:
            image = f.read()
        return client.complete(grounding_messages(sample.instruction, image))

    result = evaluate(samples, answer, model_version=args.model_version, sizes=sizes, min_pixels=args.min_pixels,
                      max_pixels=args.max_pixels)
    print(f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['n']}), "
          f"wrong_format {result['wrong_format']}")
    for title, table in (("platform", result["by_platform"]), ("element type", result["by_type"])):
        for key, row in sorted(table.items()):
            print(f"  {title:12s} {key:16s} {row['accuracy']:.4f} ({row['correct']}/{row['n']})")
    if args.out:
        from flashtune.agent.report import write_atomic

        write_atomic(args.out, json.dumps(result, indent=2, ensure_ascii=False))
        print(f"wrote {args.out}")
    return 0


def cmd_parse(args) -> int:
    from flashtune.agent.coords import CoordinateMapper
    from flashtune.agent.executors.pyautogui_code import to_pyautogui
    from flashtune.agent.parser import parse_response

    text = args.text if args.text is not None else sys.stdin.read()
    step = parse_response(text)
    out = step.to_dict()
    if args.screen:
        mapper = CoordinateMapper(*args.screen, version=args.model_version)
        out["screen_points"] = [list(mapper.to_screen(*a.start.center, dialect=a.start.dialect))
                                if a.start else None for a in step.actions]
        out["pyautogui"] = to_pyautogui(step.actions, mapper)
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def cmd_fake_server(args) -> int:
    from flashtune.agent.fake_server import FakeModelServer, load_script

    check_range("--port", args.port, 0, 65535, integer=True)
    check_range("--linger", args.linger, 0)
    server = FakeModelServer(load_script(args.script), port=args.port)
    print(f"fake UI-TARS endpoint: {server.url}", flush=True)
    server.start()
    try:
        while server.script:
            time.sleep(0.2)
        time.sleep(args.linger)  # let the last answer go out
    finally:
        server.stop()
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "agent", help="UI-TARS GUI agent: run, ground, parse, fake-server",
        description="Run UI-TARS-style GUI agents against an OpenAI-compatible endpoint "
                    "(see docs/agent.md).")
    sub = p.add_subparsers(dest="agent_command", metavar="ACTION")

    r = sub.add_parser("run", help="run one task: screenshot -> model -> action, until finished",
                       description="Run one task with a UI-TARS model; writes screenshots, raw responses, "
                                   "parsed actions (trajectory.json) and report.html to --out.")
    r.add_argument("--task", required=True, help="the instruction for the agent")
    _add_model_args(r)
    r.add_argument("--executor", choices=["browser", "x11"], default="browser",
                   help="browser: headless Chromium via Playwright; x11: xdotool on --display or a new Xvfb")
    r.add_argument("--start-url", default=None, help="page to open first (browser, or a kiosk window on X11)")
    r.add_argument("--size", type=_size, default=(1280, 720), help="viewport / screen WIDTHxHEIGHT (1280x720)")
    r.add_argument("--scale-factor", type=float, default=1.0, help="browser device scale factor (default 1)")
    r.add_argument("--display", default=None, help="x11: an existing display such as :0 (default: start Xvfb)")
    r.add_argument("--startup-seconds", type=float, default=30.0,
                   help="x11: the longest wait for the --start-url window to draw (default 30)")
    r.add_argument("--max-steps", type=int, default=15)
    r.add_argument("--template", choices=["computer", "mobile", "browser"], default="computer",
                   help="action space offered and allowed: computer (desktop), mobile, or browser (computer + "
                        "navigate/navigate_back)")
    r.add_argument("--allow-host", action="append", metavar="HOST",
                   help="navigation allow-list (repeatable; example.com, *.example.com, or HOST:PORT for one "
                        "port); default: the start URL's host and any public host. This machine and private "
                        "networks are opened on the start URL's port and listed ports only (127.0.0.1:9000). "
                        "Metadata and link-local addresses are never allowed")
    r.add_argument("--stuck-after", type=int, default=3,
                   help="end with status 'stuck' when the same action is proposed on an unchanged screenshot "
                        "this many times in a row (default 3; 0 turns the guard off)")
    r.add_argument("--answer-retries", type=int, default=2,
                   help="times per step an unparseable or refused answer is sent back to the model (default 2)")
    r.add_argument("--max-type-chars", type=int, default=2000,
                   help="longest text one type() may enter (default 2000)")
    r.add_argument("--language", default="English", help="language of the Thought part (default English)")
    r.add_argument("--wait-seconds", type=float, default=5.0, help="what wait() sleeps (default 5)")
    r.add_argument("--out", default=None, help="trajectory folder (default agent_runs/<time>)")
    r.set_defaults(func=cmd_run)

    g = sub.add_parser("ground", help="grounding accuracy on ScreenSpot-style data",
                       description="Score click grounding: a hit when the point is inside the box (edges count).")
    g.add_argument("--data", required=True, help="JSON list with img_filename, bbox, instruction, ...")
    g.add_argument("--images", default=None, help="image folder (default: the data file's folder)")
    g.add_argument("--bbox-format", choices=["auto", "xywh", "xyxy"], default="auto",
                   help="auto: xyxy when a record has img_size (ScreenSpot-Pro), else xywh (ScreenSpot)")
    g.add_argument("--limit", type=int, default=None, help="score only the first N samples (N >= 1)")
    g.add_argument("--out", default=None, help="write the summary and per-sample rows as JSON")
    _add_model_args(g)
    g.set_defaults(func=cmd_ground)

    s = sub.add_parser("parse", help="parse a model answer; print JSON (and pyautogui code with --screen)")
    s.add_argument("--text", default=None, help="the answer (default: read stdin)")
    s.add_argument("--screen", type=_size, default=None, help="screenshot WIDTHxHEIGHT to map points onto")
    s.add_argument("--model-version", default="1.5", choices=["1.5", "1.0", "doubao"])
    s.set_defaults(func=cmd_parse)

    f = sub.add_parser("fake-server", help="serve scripted answers as an OpenAI-compatible model on 127.0.0.1",
                       description="Answers each chat request with the next entry of --script (a JSON list); "
                                   "exits when the script is used up.")
    f.add_argument("--script", required=True)
    f.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    f.add_argument("--linger", type=float, default=1.0, help="seconds to stay up after the last answer")
    f.set_defaults(func=cmd_fake_server)

    def _help(args, parser=p) -> int:
        parser.print_help()
        return 2

    p.set_defaults(func=_help)
