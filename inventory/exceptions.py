from common.exceptions import BusinessFailure


class InsufficientStock(BusinessFailure):
    pass


class UnknownProduct(BusinessFailure):
    pass


class StockBelowReserved(ValueError):
    """A stock change would leave fewer units on hand than orders hold."""


class PriceChanged(BusinessFailure):
    """A line's catalogue price is not the price the customer was quoted: the order
    fails rather than charging something other than what was quoted."""


class ProductExists(ValueError):
    """A product with this SKU exists already (another operator added it a moment ago)."""
