"""``pytorch_quantization.nn._functions.quant_rnn`` under :mod:`qdq.compat`: its quantized
LSTM cell function. The rest of that module (autograd RNN builders) is internal to its
modules and has no counterpart; qdq's ``QuantLSTM`` runs its own recurrence."""

from qdq.nn.rnn import quant_lstm_cell as LSTMCell  # noqa: N812 - pytorch-quantization's name

__all__ = ["LSTMCell"]
