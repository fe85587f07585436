from common.exceptions import StepFailed


class PaymentDeclined(StepFailed):
    pass
