using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Tests;

/// <summary>
/// A request as a transport hands it to <see cref="ServerCall"/>, for tests that drive the server side by
/// hand: a body and no payloads, this process as the caller, replies dropped; a test overrides what it needs.
/// </summary>
internal abstract class FakeInboundCall(int methodId, byte[]? body = null) : IInboundCall
{
    public int MethodId => methodId;

    public ReadOnlyMemory<byte> BodyMemory => body;

    public int PayloadCount => 0;

    public CancellationToken CancellationToken => CancellationToken.None;

    public int PeerProcessId => Environment.ProcessId;

    public uint PeerUserId => 0;

    public bool IsPayloadTaken(int index) => throw new NotSupportedException();

    public SharedBuffer TakePayload(int index) => throw new NotSupportedException();

    public Stream OpenPayloadStream(int index, CancellationToken cancellationToken) => throw new NotSupportedException();

    public SharedBuffer Rent(int bytes, CancellationToken cancellationToken) => LocalLeases.Instance.Rent(bytes);

    public virtual void Reply(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads)
    {
    }

    public void AbortConnection(ProtocolViolationException violation) => throw violation;
}
