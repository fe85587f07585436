from common.exceptions import StepFailed


class InsufficientStock(StepFailed):
    pass


class UnknownProduct(StepFailed):
    pass
