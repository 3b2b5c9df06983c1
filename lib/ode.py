"""Adaptive ODE solves on [0, T] as both the probability-flow sampler and the likelihood run them (torchdiffeq)."""
from torchdiffeq import odeint

# Only adaptive solvers: a fixed-grid one given the span [t0, t1] would take a single step.
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


class ODESolveError(Exception):
    """The adaptive solve could not proceed (its step size underflowed); the message is one line."""


def check_ode_method(method):
    """Return method if it names an adaptive torchdiffeq solver, else raise ValueError listing them."""
    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; allowed (adaptive): {', '.join(ADAPTIVE_METHODS)}")
    return method


def solve_to_end(func, state0, t_span, rtol, atol, method):
    """The state at t_span[-1] of d state / dt = func(t, state) from t_span[0], adaptively.

    state0: a tensor or a tuple of tensors (as torchdiffeq takes them); t_span: (2,) tensor; method: one of
    ADAPTIVE_METHODS (callers check it with check_ode_method before any network evaluation).
    The last step lands exactly on t_span[-1]: by default the adaptive solvers step past the end and
    interpolate back, which would evaluate the drift outside [0, T] (forward time s < 0, where the VP
    variance is negative). ODESolveError when the step size underflows (a non-finite drift does that).
    """
    try:
        solution = odeint(func, state0, t_span, rtol=rtol, atol=atol, method=method,
                          options={"step_t": t_span[-1:]})
    except AssertionError as err:
        if "underflow in dt" not in str(err):  # torchdiffeq's only assertion about the solve itself
            raise
        raise ODESolveError(f"the adaptive ODE solve stopped: its step size underflowed ({err}), as it does when the "
                            "network's outputs are non-finite (nan, inf) or the ODE is too stiff for rtol/atol; "
                            "check the checkpoint (an earlier one?) or loosen --rtol/--atol") from None
    if isinstance(solution, tuple):
        return tuple(v[-1] for v in solution)
    return solution[-1]
