from common.exceptions import BusinessFailure


class PaymentDeclined(BusinessFailure):
    pass
