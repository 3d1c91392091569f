"""The samples table prints prompts and responses as written: untrusted text, never rich
markup (Llama 2's template closes its prompt with "[/INST]", which rich read as a closing
tag and raised on)."""

from __future__ import annotations

from rlhflab.commands.sample import print_samples
from rlhflab.sampling import Completion


def test_markup_in_prompts_and_responses_is_printed_as_written(capsys):
    completions = [Completion("<s>[INST] say hi [/INST]", "[bold]hi[/bold] [red]", [1, 2], True),
                   Completion("[link=javascript:alert(1)]x", "plain", [3], False)]
    print_samples(completions, None, title="samples")
    out = capsys.readouterr().out
    for text in ("[/INST]", "[bold]hi[/bold]", "[red]", "[link=javascript:alert(1)]x"):
        assert text in out
