"""Caption decoders. Importing this package registers every decoder module in it."""

from architectures.decoders import attn_lstm, lstm, rnn, transformer  # noqa: F401
from architectures.decoders.base import CaptionDecoder, DecoderOutput, State

__all__ = ["CaptionDecoder", "DecoderOutput", "State"]
