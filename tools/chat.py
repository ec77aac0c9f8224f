"""Ask a trained model: one question (or a conversation) about images and videos, the answer streamed as it is made.

    python -m tools.chat RUN_OR_HF_DIR [--image IMG ...] [--video VID ...] "QUESTION"
                         [--temperature T [--top-p P] [--seed N]] [--max-new-tokens N] [--system TEXT]
                         [--tokenizer DIR] [--device cpu|cuda] [--dtype bf16|fp16|fp32]
    python -m tools.chat runs/demo/stage3 --image runs/demo/data/media/digits/d1500.png "Which digit is this?"

The model is one of our checkpoints (a step_* dir, or a checkpoint / run dir: its latest complete step; the tokenizer,
pixel limits and video sampling come from its config.yaml) or an HF directory of a supported family (its tokenizer
unless --tokenizer; the family's default pixel limits), loaded as tools.eval loads it. The question is rendered as
in training: a ChatML user turn holding the media (in the order given) and the text, the family's default system
prompt unless --system, then `<|im_start|>assistant\\n`; images get the run's dynamic resolution, videos its frame
sampling.
Decoding uses the KV cache of model/generate.py, greedy by default (the answers the evaluation scores), sampled with
--temperature > 0 (top-p nucleus, --seed repeats an answer); tokens are printed as they come, until <|im_end|> or
--max-new-tokens.

Without a QUESTION it is a conversation: each line read from stdin is the next user turn (the media belong to the
first), the answers stay in the context; an empty line or end of input ends it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from core.cli import run_cli
from core.dtypes import DTYPES
from data.chatml import SkipSample
from data.sample import RawSample, SampleProcessor
from data.tokenizer import Tokenizer
from model.generate import Generation, Sampling, generate
from model.vlm import VLModel
from tools.eval import load_for_eval
from train.eval import prompt_sample


class TextStream:
    """Token ids -> text as soon as it is printable: a token that ends inside a multi-byte character (a partial
    UTF-8 sequence decodes to U+FFFD) waits for the next one."""

    def __init__(self, tok: Tokenizer, write: Callable[[str], None], stop_ids: set[int]) -> None:
        self.tok, self.write, self.stop_ids = tok, write, stop_ids
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, token: int) -> None:
        if token in self.stop_ids:
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd") and len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids)


def user_turn(question: str, images: list[str], videos: list[str]) -> tuple[dict, dict[str, bytes]]:
    """A user message (media first, in the order given, then the text) and its media as sample members."""
    content: list[dict] = []
    members: dict[str, bytes] = {}
    for kind, paths in (("image", images), ("video", videos)):
        for i, path in enumerate(paths):
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"--{kind} {path}: no such file")
            name = f"{kind}{i}{p.suffix.lower()}"
            members[name] = p.read_bytes()
            content.append({"type": kind, kind: name})
    content.append({"type": "text", "text": question})
    return {"role": "user", "content": content}, members


def answer(model: VLModel, proc: SampleProcessor, messages: list[dict], members: dict[str, bytes], *,
           max_new_tokens: int, sampling: Sampling | None, write: Callable[[str], None]) -> tuple[str, Generation]:
    """Stream the model's next assistant turn after `messages`; (its text, the generation)."""
    obj = {"messages": [*messages, {"role": "assistant", "content": ""}]}
    raw = RawSample(key="chat", members={**members, "json": json.dumps(obj).encode()})
    try:
        prompt = prompt_sample(proc, raw, obj)
    except SkipSample as e:  # unreadable media, a prompt over the data limits, ...: the same reasons as training's
        raise ValueError(f"cannot build the prompt: {e}") from e
    b, sp = prompt.batch, proc.tok.special
    dev = model.embed_tokens.weight.device
    stream = TextStream(proc.tok, write, {sp.im_end, sp.endoftext})
    gen = generate(model, b.input_ids, max_new_tokens=max_new_tokens, eos_token_ids=(sp.im_end, sp.endoftext),
                   position_ids=b.position_ids, pixel_values=b.pixel_values.to(dev), image_grid_thw=b.image_grid_thw,
                   pixel_values_videos=b.pixel_values_videos.to(dev), video_grid_thw=b.video_grid_thw,
                   sampling=sampling, on_token=stream)
    return stream.text, gen


def _questions(args: argparse.Namespace) -> Iterator[str]:
    if args.question is not None:
        yield args.question
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.strip()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.chat", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a checkpoint of ours (step_* dir, checkpoint dir or run dir) or an HF directory")
    ap.add_argument("question", nargs="?", default=None,
                    help="the question; without it, every stdin line is the next turn of a conversation")
    ap.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    ap.add_argument("--video", action="append", default=[], help="a video file (repeat for several)")
    ap.add_argument("--system", default=None,
                    help="a system prompt (default: the family's chat template's, as in training)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer in tokens (default 256)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature > 0: nucleus mass (default 1.0)")
    ap.add_argument("--seed", type=int, default=None, help="with --temperature > 0: seed of the draws")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's or HF dir's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast the weights (default: as stored)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_intermixed_args(argv)  # the question may come before or after the options
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    sampling = Sampling(args.temperature, args.top_p, args.seed)  # a ValueError names a bad value
    for kind in ("image", "video"):  # before the model loads: a typo fails at once
        for path in getattr(args, kind):
            if not Path(path).is_file():
                raise FileNotFoundError(f"--{kind} {path}: no such file")
    model, data_cfg = load_for_eval(args.model, args.device, DTYPES[args.dtype] if args.dtype else None,
                                    args.tokenizer)
    proc = SampleProcessor(data_cfg, vision=model.processing)  # the model family's processor facts
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system is not None else []
    media: dict[str, bytes] = {}
    first = True
    for question in _questions(args):
        turn, files = user_turn(question, args.image if first else [], args.video if first else [])
        media.update(files)
        first = False
        messages.append(turn)
        text, _ = answer(model, proc, messages, media, max_new_tokens=args.max_new_tokens, sampling=sampling,
                         write=lambda s: print(s, end="", flush=True))
        print(flush=True)
        messages.append({"role": "assistant", "content": text})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("python -m tools.chat", main))
