"""The domain exceptions of mnist-service.

Nothing here knows about gRPC: the service maps these to status codes in one table
(`mnist_service.status.STATUS_FOR_ERROR`). The tree::

    MnistServiceError
    ├── InvalidImageError            the request's image cannot be classified
    │   ├── EmptyImageError          no bytes at all
    │   ├── UndecodableImageError    not an image we can decode (or truncated), nor 784 raw pixels
    │   ├── ImageTooLargeError       more pixels than the configured limit (checked before decoding)
    │   └── BlankImageError          decoded fine, but there is no ink to classify
    ├── MessageTooLargeError         a request message over the size limit, or over what its
    │                                connection may have arriving at once (checked from the prefix)
    ├── SlowMessageError             a request message that takes too long to arrive
    ├── OverloadedError              more images waiting than `--max-queue` allows
    ├── DeadlineExpiredError         the caller's deadline passed before its image was worked on
    ├── MalformedMessageError        a request message that is not valid protobuf for its type
    ├── UnsupportedEncodingError     a request message compressed with an encoding other than gzip
    ├── CompressionError             a compressed request message that breaks gRPC's rules: the
    │                                compressed flag without a grpc-encoding, or a corrupt gzip body
    ├── TooManyImagesError           a PredictBatch request (or an inference request's batch)
    │                                with more images than allowed
    ├── InvalidTensorError           an inference request whose tensors do not match the model's
    │                                metadata: name, datatype, shape, byte count or values
    ├── ModelNotFoundError           an inference request for a model or version not served here
    ├── UnsupportedMethodError       an RPC of Triton's protocol that this server does not implement
    ├── ModelError                   a model file is missing, unreadable or has the wrong contract;
    │   │                            at run time, a version refused before it could serve
    │   └── RepositoryError          a model repository's layout, config.json or paths are wrong
    ├── ModelControlError            the model control API is off (--model-control none)
    └── ConfigError                  a setting is invalid (raised while building the config)
"""


class MnistServiceError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidImageError(MnistServiceError, ValueError):
    """The request's image cannot be classified; the message says why, for the client."""


class EmptyImageError(InvalidImageError):
    """Raised when the request carries no image bytes."""


class UndecodableImageError(InvalidImageError):
    """Raised when the bytes are neither a decodable image file nor 784 raw pixels."""


class ImageTooLargeError(InvalidImageError):
    """Raised when an image has more pixels than allowed, before its pixels are decoded."""


class BlankImageError(InvalidImageError):
    """Raised when an image decodes but holds no ink (a uniform image)."""


class MessageTooLargeError(MnistServiceError):
    """Raised when a request message is larger than `Limits.max_message_bytes`, or would take
    its connection over `Limits.max_connection_bytes` of messages arriving at once."""


class SlowMessageError(MnistServiceError):
    """Raised when a request message's body does not arrive within `Limits.max_message_seconds`."""


class OverloadedError(MnistServiceError):
    """Raised when accepting more images would exceed `Limits.max_queue`."""


class DeadlineExpiredError(MnistServiceError):
    """Raised for an image whose caller's deadline passed while it waited for preprocessing or
    for a batch: it is dropped, not worked on."""


class MalformedMessageError(MnistServiceError):
    """Raised when a request message is not valid protobuf (truncated, a bad wire type...)."""


class UnsupportedEncodingError(MnistServiceError):
    """Raised when a request message is compressed with an encoding other than gzip."""


class CompressionError(MnistServiceError):
    """Raised when a request message has the compressed flag but the call names no
    grpc-encoding (or identity), or its gzip body does not inflate (corrupt or cut short)."""


class TooManyImagesError(MnistServiceError):
    """Raised when a PredictBatch request holds more images than `Limits.max_batch_images`."""


class InvalidTensorError(MnistServiceError, ValueError):
    """Raised when an inference request's inputs or requested outputs do not match what the
    model's metadata declares; the message names the tensor and what was expected."""


class ModelNotFoundError(MnistServiceError, LookupError):
    """Raised when an inference request names a model, or a version of one, that this server
    does not serve (or has not loaded)."""


class UnsupportedMethodError(MnistServiceError):
    """Raised for an RPC of Triton's inference service that this server does not implement."""


class ModelError(MnistServiceError):
    """Raised when a model file is missing, unreadable or breaks the contract, or (loading at
    run time) fails its warm-up or golden check: at startup the server does not start, at run
    time the version is refused and the old one keeps serving."""


class RepositoryError(ModelError):
    """Raised when a model repository's layout or a model's config.json is wrong, or a path
    leads out of the repository."""


class ModelControlError(MnistServiceError):
    """Raised for a load or unload request while the model control API is off."""


class ConfigError(MnistServiceError, ValueError):
    """Raised when a setting is invalid."""
