"""Shell completion scripts for ``smc completion bash|zsh|fish``.

Role: bash and zsh use click's scripts. Fish gets SMC's own (:class:`FishCompletion`,
registered over click's at import): click 8.4's fish script is broken (its template writes a
raw newline into ``string split`` and its answers span three lines each, so a real fish runs
each line as a command). Here each answer is one line, ``type<TAB>value<TAB>help`` with tabs
and newlines inside value and help made spaces, and the script splits it with
``string split -m 2``; ``_`` stands for no help, as in the zsh protocol.
Concurrency: pure; the completion itself runs in a fresh ``smc`` process per key press.
"""

from __future__ import annotations

from click.shell_completion import CompletionItem, FishComplete, add_completion_class

__all__ = ["FishCompletion"]

_SOURCE_FISH = r"""function %(complete_func)s;
    set -l response (env %(complete_var)s=fish_complete COMP_WORDS=(commandline -cp) COMP_CWORD=(commandline -t) %(prog_name)s);

    for completion in $response;
        set -l metadata (string split -m 2 \t -- $completion);

        if test "$metadata[1]" = "dir";
            __fish_complete_directories $metadata[2];
        else if test "$metadata[1]" = "file";
            __fish_complete_path $metadata[2];
        else if test "$metadata[1]" = "plain";
            if test "$metadata[3]" != "_";
                printf '%%s\t%%s\n' $metadata[2] $metadata[3];
            else;
                printf '%%s\n' $metadata[2];
            end;
        end;
    end;
end;

complete --no-files --command %(prog_name)s --arguments "(%(complete_func)s)";
"""


def _one_line(text: str) -> str:
    return " ".join(text.replace("\t", " ").splitlines())


class FishCompletion(FishComplete):
    """Fish completion that works with a real fish (see the module docstring)."""

    source_template = _SOURCE_FISH

    def format_completion(self, item: CompletionItem) -> str:
        return f"{item.type}\t{_one_line(item.value)}\t{_one_line(item.help or '') or '_'}"


add_completion_class(FishCompletion, "fish")
