class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class OrderNotCancellable(Exception):
    """The order is past the point where it can be cancelled."""


class UnknownSkus(Exception):
    def __init__(self, skus: list[str]) -> None:
        super().__init__(f"unknown SKU(s): {', '.join(skus)}")
        self.skus = skus


class OrderTotalTooLarge(Exception):
    """The order's total is more than an order's total can hold."""

    def __init__(self, total: object, most: object) -> None:
        super().__init__(f"the order's total, {total}, is more than an order may come to ({most})")
        self.total, self.most = total, most
