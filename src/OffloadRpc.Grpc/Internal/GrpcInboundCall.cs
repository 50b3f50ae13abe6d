using global::Grpc.Core;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Grpc.Internal;

/// <summary>A request that came over gRPC, as the dispatcher and the generated stub see it.</summary>
internal sealed class GrpcInboundCall : IInboundCall, IDisposable
{
    private readonly MessageAssembler _message;
    private readonly CancellationTokenSource _cancellation;
    private readonly byte[]? _metadata;
    private OutgoingMessage? _reply;

    public GrpcInboundCall(int methodId, MessageAssembler message, ServerCallContext context)
    {
        MethodId = methodId;
        _message = message;
        _cancellation = CancellationTokenSource.CreateLinkedTokenSource(context.CancellationToken);
        foreach (Metadata.Entry entry in context.RequestHeaders)
        {
            if (entry.IsBinary && entry.Key == GrpcWire.MetadataHeader)
            {
                _metadata = entry.ValueBytes;
            }
            else if (!entry.IsBinary && entry.Key == GrpcWire.PeerHeader)
            {
                string[] parts = entry.Value.Split(':');
                if (parts.Length == 2 && int.TryParse(parts[0], out int pid) && uint.TryParse(parts[1], out uint uid))
                {
                    PeerProcessId = pid;
                    PeerUserId = uid;
                }
            }
        }
    }

    public int MethodId { get; }

    public ReadOnlyMemory<byte> BodyMemory => _message.Body;

    public int PayloadCount => _message.PayloadCount;

    public CancellationToken CancellationToken => _cancellation.Token;

    /// <summary>What the caller says it is (its "offloadrpc-peer" header; -1 when absent). Not verified: a gRPC peer may be on another host.</summary>
    public int PeerProcessId { get; } = -1;

    public uint PeerUserId { get; } = uint.MaxValue;

    public bool HasMetadata => _metadata is not null;

    public ReadOnlyMemory<byte> Metadata => _metadata;

    public long PayloadBytes => _message.PayloadBytes;

    /// <summary>The call broke the protocol (arguments that do not decode): answered with status Internal.</summary>
    public ProtocolViolationException? Violation { get; private set; }

    public bool IsPayloadTaken(int index) => _message.IsTaken(index);

    public SharedBuffer TakePayload(int index) => _message.Take(index) ?? throw new ProtocolViolationException($"The request names payload {index} twice.");

    public Stream OpenPayloadStream(int index, CancellationToken cancellationToken) => new LeaseStream(TakePayload(index));

    /// <summary>Ordinary memory of this process: over gRPC a returned lease is copied into the reply.</summary>
    public SharedBuffer Rent(int bytes, CancellationToken cancellationToken) => LocalLeases.Instance.Rent(bytes);

    public void Reply(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads)
    {
        if (_reply is not null)
        {
            throw new InvalidOperationException("The call was already answered.");
        }

        _reply = OutgoingMessage.Create(body, payloads);
    }

    /// <summary>The reply the stub made (a call without one gets an empty reply).</summary>
    public OutgoingMessage TakeReply()
    {
        OutgoingMessage reply = _reply ?? OutgoingMessage.EmptyReply;
        _reply = null;
        return reply;
    }

    public void AbortConnection(ProtocolViolationException violation) => Violation ??= violation;

    public void CancelAfter(TimeSpan delay) => _cancellation.CancelAfter(delay);

    public void Dispose()
    {
        _reply?.Dispose();
        _message.Dispose();
        _cancellation.Dispose();
    }

    /// <summary>A read-only stream over a payload; closing it gives the lease back.</summary>
    private sealed class LeaseStream(SharedBuffer lease) : Stream
    {
        private long _position;

        public override bool CanRead => true;

        public override bool CanSeek => true;

        public override bool CanWrite => false;

        public override long Length => lease.Length;

        public override long Position
        {
            get => _position;
            set => _position = Math.Clamp(value, 0, lease.Length);
        }

        public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

        public override int Read(Span<byte> buffer)
        {
            int n = (int)Math.Min(buffer.Length, lease.Length - _position);
            lease.Span.Slice((int)_position, n).CopyTo(buffer);
            _position += n;
            return n;
        }

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) => ValueTask.FromResult(Read(buffer.Span));

        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => Task.FromResult(Read(buffer, offset, count));

        public override long Seek(long offset, SeekOrigin origin)
        {
            Position = origin switch { SeekOrigin.Begin => offset, SeekOrigin.Current => _position + offset, _ => lease.Length + offset };
            return _position;
        }

        public override void Flush()
        {
        }

        public override void SetLength(long value) => throw new NotSupportedException();

        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

        protected override void Dispose(bool disposing)
        {
            lease.Dispose();
            base.Dispose(disposing);
        }
    }
}
