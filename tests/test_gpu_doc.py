"""docs/gpu.md stays true: its list of issue #27's items names, for each, tests that exist (or the issue that owns
the item), and what it says of the decode loop's host reads and of ``sat-infer``'s stream is what the code does."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from sat_export.pipeline.infer import caption_rows
from sat_export.pipeline.reading import Loaded
from sat_export.pipeline.inputs import InputItem
from tests.training.host_reads import HostReads
from training.decode import greedy_search
from training.options import DecodeOptions

ROOT = Path(__file__).resolve().parent.parent
GPU_MD = (ROOT / "docs" / "gpu.md").read_text(encoding="utf-8")


def _tests_in(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}


def test_every_item_of_issue_27_is_listed_with_tests_that_exist():
    rows = dict(re.findall(r"^\| (\d+) \| .* \| (.*) \|$", GPU_MD, re.M))
    assert sorted(map(int, rows)) == list(range(1, 12))
    for item, verified in rows.items():
        cited = re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", verified)
        assert cited, f"item {item} names no test"
        path = None
        for file, test in cited:
            path = ROOT / file if file else path  # `::name` continues the last file named
            assert path is not None and path.is_file(), (item, file)
            assert not test or test in _tests_in(path), (item, path.name, test)


def test_greedy_host_reads_per_step_are_what_gpu_md_says():
    """Three images end at steps 1, 3 and 3 of at most 5; reads counted per step (``HostReads``), on the CPU."""
    said = re.search(r"greedy\s+decoding reads the device from the host once per step \(`bool\(ended\.any\(\)\)`\), "
                     r"and (\d+) times more on a step where\s+rows end", GPU_MD)
    assert said, "docs/gpu.md no longer says how often greedy decoding reads the device"
    ends, n_pix, end = torch.tensor([1, 3, 3, 9]), 2, 2
    reads = HostReads()

    def step(tokens, h, c, features, features_proj):  # image i says <end> at step ends[i]
        reads.mark("step")
        image = features[:, 0, 0].long()  # (n_act,): each row's image, carried in its features
        logprobs = torch.full((tokens.size(0), 1, 6), -5.0)  # (n_act, 1 beam, vocab)
        logprobs[:, :, 4] = -1.0
        logprobs[:, 0, end] = torch.where(ends[image] == len(reads.per_mark("step")) - 1, 0.0, -9.0)
        return logprobs, torch.full((tokens.size(0), 1, n_pix), 0.5), h, c

    features = torch.arange(4.0).view(4, 1, 1).expand(4, n_pix, 1).contiguous()
    enc = (features, torch.zeros(4, n_pix, 1), torch.zeros(4, 3), torch.zeros(4, 3))
    with torch.inference_mode(), reads:
        captions = greedy_search(step, enc, {"start": 1, "end": end}, DecodeOptions(max_len=5))
    assert [len(c.tokens) for c in captions] == [1, 3, 3, 5]
    per_step = reads.per_mark("step")[:-1]  # the last step's count runs on into the captions' copy to the host
    more = int(said.group(1))
    assert per_step == [1, 1 + more, 1, 1 + more]


class _Recording:
    """A backend whose ``running()`` says when the decode loop's work is inside it."""

    def __init__(self, backend):
        self.inside, self.calls, self._backend = False, [], backend
        self.config, self.vocab, self.device = backend.config, backend.vocab, backend.device

    def running(self):
        from contextlib import contextmanager

        @contextmanager
        def block():
            self.inside = True
            try:
                yield
            finally:
                self.inside = False
        return block()

    def encode(self, images):
        self.calls.append(("encode", self.inside))
        return self._backend.encode(images)

    def step(self, *inputs):
        self.calls.append(("step", self.inside))
        return self._backend.step(*inputs)


def test_sat_infer_decodes_inside_backend_running_as_gpu_md_says(tiny_ckpt):
    from sat_export.registry import open_backend

    assert "`sat-infer` enters `backend.running()`" in GPU_MD.replace("\n  ", " ")
    backend = _Recording(open_backend(tiny_ckpt, "torch", "cpu"))
    entry = Loaded(InputItem(Path("a.jpg"), "a.jpg"), torch.zeros(3, 64, 64).numpy(), None)
    caption_rows(backend, [entry], DecodeOptions(max_len=3))
    assert backend.calls and all(inside for _, inside in backend.calls)
