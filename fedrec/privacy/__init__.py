"""Customer-level differential privacy (issue 10).

The unit protected is one customer's whole purchase history at one merchant; the adversary is
everyone outside that merchant (the coordinator, the other merchants, whoever reads the export
or calls the API).
- `config.py`: the `[privacy]` settings (budget, clipping bound, sampling rate).
- `accountant.py`: the noise needed for a budget and the budget spent, from Opacus's PRV
  accountant (or its RDP one: `privacy.accountant`; no home-made accounting).
- `dp_sgd.py`: the merchant's private step: Poisson-sampled customers, per-customer gradients
  (torch.func), clipping, Gaussian noise, all before anything leaves the merchant.
- `noisy_als.py` (`privacy.mechanism = "als"`): ALS's item step from each merchant's clipped,
  noised sums, one Gaussian release a round.
"""
