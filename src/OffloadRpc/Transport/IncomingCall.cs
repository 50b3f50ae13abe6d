using System.Buffers;
using System.Buffers.Binary;
using System.Text;

namespace OffloadRpc.Transport;

/// <summary>Handles requests that arrive on a connection (the server's side).</summary>
internal interface IRequestHandler
{
    /// <summary>
    /// Handles one request. Reply with <see cref="IncomingCall.Reply"/>; a handler that returns without
    /// replying sends an empty response, one that throws sends the exception as a fault. Runs on the
    /// connection's receive thread until its first await.
    /// </summary>
    ValueTask HandleAsync(IncomingCall call);
}

/// <summary>A request being served: its body, payloads, cancellation, and the way to answer it. Pooled per connection.</summary>
internal sealed class IncomingCall : InboundMessage
{
    private CancellationTokenSource? _cancellation;
    private int _replied;

    public IncomingCall(RpcConnection connection)
        : base(connection, connection.Geometry.SlotSize)
    {
    }

    public ulong CallId { get; private set; }

    /// <summary>Fires when the caller cancels the call or the connection closes.</summary>
    public CancellationToken CancellationToken => EnsureCancellation().Token;

    public bool HasReplied => Volatile.Read(ref _replied) != 0;

    internal void Begin(ulong callId)
    {
        CallId = callId;
        _replied = 0;
    }

    private CancellationTokenSource EnsureCancellation()
    {
        CancellationTokenSource? source = Volatile.Read(ref _cancellation);
        if (source is null)
        {
            source = new CancellationTokenSource();
            source = Interlocked.CompareExchange(ref _cancellation, source, null) ?? source;
        }

        return source;
    }

    /// <summary>Sends the response. Once per call.</summary>
    public void Reply(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads = default)
    {
        if (Interlocked.Exchange(ref _replied, 1) != 0)
        {
            throw new InvalidOperationException("The call was already answered.");
        }

        Connection.Send(MessageKind.Response, CallId, MethodId, body, payloads, CancellationToken.None);
    }

    /// <summary>Sends <paramref name="exception"/> to the caller as a <see cref="RemoteInvocationException"/>.</summary>
    public void Fail(Exception exception)
    {
        if (Interlocked.Exchange(ref _replied, 1) != 0)
        {
            return;
        }

        byte[] buffer = ArrayPool<byte>.Shared.Rent(FaultCodec.MaxEncodedLength(exception));
        try
        {
            int length = FaultCodec.Encode(exception, buffer);
            Connection.Send(MessageKind.Fault, CallId, MethodId, buffer.AsSpan(0, length), default, CancellationToken.None);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>The caller cancelled, or the connection is closing.</summary>
    internal void Cancel()
    {
        try
        {
            EnsureCancellation().Cancel();
        }
        catch (AggregateException)
        {
            // A user callback registered on the token threw; the call itself decides what to answer.
        }
    }

    /// <summary>Clears the call for reuse; false when it cannot be reused (its token was cancelled).</summary>
    internal bool Reset()
    {
        ResetMessage();
        CallId = 0;
        CancellationTokenSource? source = _cancellation;
        if (source is not null && !source.TryReset())
        {
            source.Dispose();
            _cancellation = null;
        }

        return true;
    }
}

/// <summary>Encodes an exception as (type, message, stack) for a fault message, and decodes it with bounds checks.</summary>
internal static class FaultCodec
{
    private const int MaxField = 16 * 1024;

    public static int MaxEncodedLength(Exception exception) => 12 + 3 * MaxField * 3;

    public static int Encode(Exception exception, Span<byte> destination)
    {
        int position = 0;
        Write(exception.GetType().FullName ?? exception.GetType().Name, destination, ref position);
        Write(exception.Message, destination, ref position);
        Write(exception.StackTrace ?? string.Empty, destination, ref position);
        return position;
    }

    private static void Write(string value, Span<byte> destination, ref int position)
    {
        if (value.Length > MaxField)
        {
            value = value[..MaxField];
        }

        int length = Encoding.UTF8.GetBytes(value, destination[(position + 4)..]);
        BinaryPrimitives.WriteInt32LittleEndian(destination[position..], length);
        position += 4 + length;
    }

    /// <exception cref="ProtocolViolationException">The fault body is malformed.</exception>
    public static RemoteInvocationException Decode(ReadOnlySpan<byte> body)
    {
        int position = 0;
        string type = Read(body, ref position);
        string message = Read(body, ref position);
        string stack = Read(body, ref position);
        return new RemoteInvocationException(type, message, stack.Length == 0 ? null : stack);
    }

    private static string Read(ReadOnlySpan<byte> body, ref int position)
    {
        if (body.Length - position < 4)
        {
            throw new ProtocolViolationException("The peer sent a truncated fault.");
        }

        int length = BinaryPrimitives.ReadInt32LittleEndian(body[position..]);
        if (length < 0 || length > body.Length - position - 4)
        {
            throw new ProtocolViolationException($"The peer sent a fault field of {length} bytes in a body of {body.Length}.");
        }

        string value = Encoding.UTF8.GetString(body.Slice(position + 4, length));
        position += 4 + length;
        return value;
    }
}
