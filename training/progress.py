"""Per-round progress display (rich): round, merchants, loss, validation recall@20, seconds."""

from __future__ import annotations

from rich.console import Console

from fedrec.federated.simulation import RoundLog


class RoundPrinter:
    def __init__(self, console: Console, label: str, total_merchants: int) -> None:
        self.console, self.label, self.total = console, label, total_merchants
        self.best, self.best_round = -1.0, 0
        console.print(
            f"[bold]{'round':>5}  {'merchants':>9}  {'loss':>8}  {'val recall@20':>13}  {'seconds':>7}[/]  {label}"
        )

    def __call__(self, log: RoundLog) -> None:
        if log.refit and log.round == 1 and not self.best_round:
            self.console.print(
                "[bold]train + validation[/]: under DP the schedule sets the rounds and the last is released, "
                "so there is nothing to validate: the run trains on every purchase before the cut-off"
            )
        elif log.refit and log.round == 1:
            self.console.print(
                f"[bold]refit[/]: training again from the start on train + validation for the {self.best_round} "
                "rounds validation chose; the last of them is released"
            )
        elif log.candidate is not None and log.round == 1:
            self.console.print(f"[bold]candidate[/] {log.candidate} (chosen on validation recall@20)")
        val, mark = log.val_recall_at_20, ""
        if val is not None and val > self.best:
            mark, self.best, self.best_round = " *", val, log.round
        shown = f"{val:>13.4f}" if val is not None else f"{'-':>13}"
        self.console.print(
            f"{log.round:>5}  {len(log.merchants):>4}/{self.total:<4}  {log.loss:>8.4f}  {shown}  "
            f"{log.seconds:>7.2f}{mark}"
        )
