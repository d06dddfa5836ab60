"""Pictures: a distiller's masks as arrays (no matplotlib) and the figures drawn from them."""
