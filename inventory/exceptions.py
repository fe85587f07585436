from common.exceptions import StepFailed


class InsufficientStock(StepFailed):
    pass


class UnknownProduct(StepFailed):
    pass


class StockBelowReserved(ValueError):
    """A stock change would leave fewer units on hand than orders hold."""
