class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class OrderNotCancellable(Exception):
    """The order is past the point where it can be cancelled."""


class UnknownSkus(Exception):
    def __init__(self, skus: list[str]) -> None:
        super().__init__(f"unknown SKU(s): {', '.join(skus)}")
        self.skus = skus
