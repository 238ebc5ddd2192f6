"""Methods: how influence is computed. One module per method, one interface (:mod:`.base`).

Every module here defines one method class decorated with :func:`register`;
:mod:`infkit.registry` imports them all, so adding a method is adding one file. A method defined
outside infkit registers itself the same way::

    from infkit.methods import PrimalMethod, register

    @register
    class MyMethod(PrimalMethod):
        name = "mine"
        ...

(CONTRIBUTING.md walks through a complete example.)
"""

from infkit.methods.base import (
    BASIC,
    KRONECKER,
    PRECONDITIONED,
    PRIMAL,
    QUESTIONS,
    Fidelity,
    Method,
    PrimalMethod,
    Problem,
    Question,
    method_class,
    register,
    registered,
)

__all__ = [
    "BASIC",
    "KRONECKER",
    "PRECONDITIONED",
    "PRIMAL",
    "QUESTIONS",
    "Fidelity",
    "Method",
    "PrimalMethod",
    "Problem",
    "Question",
    "method_class",
    "register",
    "registered",
]
