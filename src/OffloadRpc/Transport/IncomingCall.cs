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
    /// connection's receiver (on the process's poller thread) until its first await.
    /// </summary>
    ValueTask HandleAsync(IncomingCall call);
}

/// <summary>A request being served: its body, payloads, cancellation, and the way to answer it. Pooled per connection.</summary>
internal sealed class IncomingCall : InboundMessage, Internal.IInboundCall
{
    private const int NotReplied = 0;
    private const int Replying = 1;
    private const int Replied = 2;

    private readonly object _gate = new();
    private CancellationTokenSource? _cancellation;
    private int _cancelling; // Cancel calls that took the source and may not have fired it yet (guarded by _gate)
    private int _replyState;
    private bool _active;

    public IncomingCall(RpcConnection connection)
        : base(connection)
    {
    }

    public ulong CallId { get; private set; }

    /// <summary>Fires when the caller cancels the call or the connection closes.</summary>
    public CancellationToken CancellationToken
    {
        get
        {
            lock (_gate)
            {
                return (_cancellation ??= new CancellationTokenSource()).Token;
            }
        }
    }

    int Internal.IInboundCall.PeerProcessId => Connection.Peer.ProcessId;

    uint Internal.IInboundCall.PeerUserId => Connection.Peer.UserId;

    SharedBuffer Internal.IInboundCall.Rent(int bytes, CancellationToken cancellationToken) => Connection.Rent(bytes, cancellationToken);

    public bool HasReplied => Volatile.Read(ref _replyState) == Replied;

    private StreamOutbox? _outbox;
    private StreamInbox? _inbox;

    /// <summary>
    /// Credit for the items of this call's streamed result: created with the call's first credit or when
    /// the stub starts streaming, whichever comes first (the client grants its window right after the request).
    /// </summary>
    public StreamOutbox Outbox
    {
        get
        {
            lock (_gate)
            {
                return _outbox ??= NewOutbox();
            }
        }
    }

    /// <summary>Sends one item of this call's streamed result.</summary>
    public void SendStreamItem(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken)
    {
        if (Volatile.Read(ref _replyState) != NotReplied)
        {
            throw new InvalidOperationException("The call was already answered: its stream has ended.");
        }

        Connection.Send(MessageKind.StreamItem, CallId, MethodId, body, payloads, cancellationToken);
    }

    /// <summary>The outbox of call <paramref name="callId"/> while it is being served; null otherwise.</summary>
    internal StreamOutbox? OutboxFor(ulong callId)
    {
        lock (_gate)
        {
            return _active && callId == CallId ? _outbox ??= NewOutbox() : null;
        }
    }

    /// <summary>This call streams its result: its producer runs on other threads until the call is reset (the connection counts it).</summary>
    private StreamOutbox NewOutbox()
    {
        Interlocked.Increment(ref Connection.StreamsBeingProduced);
        return new StreamOutbox();
    }

    StreamInbox Internal.IInboundCall.OpenInbox() => OpenInbox(Connection.StreamWindow);

    /// <summary>Opens the inbox of this call's streamed argument and grants the client its first window.</summary>
    public StreamInbox OpenInbox(int window)
    {
        StreamInbox inbox;
        lock (_gate)
        {
            if (_inbox is not null)
            {
                throw new InvalidOperationException("The call's streamed argument was already opened.");
            }

            inbox = _inbox = new StreamInbox(Connection, window);
            inbox.Attach(CallId);
        }

        inbox.GrantInitialCredit();
        return inbox;
    }

    /// <summary>The inbox of call <paramref name="callId"/> while it is being served; null otherwise.</summary>
    internal StreamInbox? InboxFor(ulong callId)
    {
        lock (_gate)
        {
            return _active && callId == CallId ? _inbox : null;
        }
    }

    /// <summary>The caller's deadline: the call's token fires after <paramref name="delay"/> (at once when it already passed).</summary>
    public void CancelAfter(TimeSpan delay)
    {
        ulong callId;
        lock (_gate)
        {
            if (!_active)
            {
                return;
            }

            callId = CallId;
            if (delay > TimeSpan.Zero)
            {
                // Under the lock, so Reset never sees a source whose timer is being armed; a positive delay runs no callback here.
                (_cancellation ??= new CancellationTokenSource()).CancelAfter(delay);
                return;
            }
        }

        Cancel(callId);
    }

    internal void Begin(ulong callId)
    {
        lock (_gate)
        {
            CallId = callId;
            _replyState = NotReplied;
            _active = true;
        }
    }

    /// <summary>Sends the response. Once per call; if sending fails the call is still unanswered (and the exception tells why).</summary>
    public void Reply(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads = default)
    {
        if (Interlocked.CompareExchange(ref _replyState, Replying, NotReplied) != NotReplied)
        {
            throw new InvalidOperationException("The call was already answered.");
        }

        try
        {
            // The caller may reuse this call's index the moment the answer lands: free it first.
            Connection.ReleaseServedIndex(this);
            Connection.Send(MessageKind.Response, CallId, MethodId, body, payloads, CancellationToken.None);
            Volatile.Write(ref _replyState, Replied);
        }
        catch
        {
            Volatile.Write(ref _replyState, NotReplied);
            throw;
        }
    }

    /// <summary>
    /// Sends <paramref name="exception"/> to the caller as a <see cref="RemoteInvocationException"/>.
    /// When the full fault cannot be sent (arena full), a short one that fits in the ring slot is.
    /// </summary>
    public void Fail(Exception exception)
    {
        if (Interlocked.CompareExchange(ref _replyState, Replying, NotReplied) != NotReplied)
        {
            return;
        }

        try
        {
            Connection.ReleaseServedIndex(this); // as for a response: the index is free before the answer lands
            byte[] buffer = ArrayPool<byte>.Shared.Rent(FaultCodec.MaxEncodedLength);
            try
            {
                int length = FaultCodec.Encode(exception, buffer, Connection.Geometry.SlotSize, full: true);
                try
                {
                    Connection.Send(MessageKind.Fault, CallId, MethodId, buffer.AsSpan(0, length), default, CancellationToken.None);
                }
                catch (ArenaExhaustedException)
                {
                    length = FaultCodec.Encode(exception, buffer, Connection.Geometry.SlotSize, full: false);
                    Connection.Send(MessageKind.Fault, CallId, MethodId, buffer.AsSpan(0, length), default, CancellationToken.None);
                }
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }

            Volatile.Write(ref _replyState, Replied);
        }
        catch
        {
            Volatile.Write(ref _replyState, NotReplied);
            throw;
        }
    }

    void Internal.IInboundCall.AbortConnection(ProtocolViolationException violation) =>
        Connection.Terminate(new ProtocolViolationException($"Protocol violation by peer process {Connection.Peer.ProcessId}: {violation.Message} The connection is closed.", violation));

    /// <summary>The caller cancelled <paramref name="callId"/>, or the connection is closing (null): cancel if this call is still the one being served.</summary>
    internal void Cancel(ulong? callId)
    {
        CancellationTokenSource source;
        lock (_gate)
        {
            if (!_active || (callId is { } id && id != CallId))
            {
                return;
            }

            source = _cancellation ??= new CancellationTokenSource();
            _cancelling++; // until it has fired, Reset must not hand this source to the next call
        }

        // Outside the lock: user callbacks on the token run here and must not hold up Reset.
        try
        {
            source.Cancel();
        }
        catch (AggregateException)
        {
            // A user callback registered on the token threw; the call itself decides what to answer.
        }
        catch (ObjectDisposedException)
        {
            // The call finished meanwhile.
        }
        finally
        {
            lock (_gate)
            {
                _cancelling--;
            }
        }
    }

    /// <summary>Clears the call for reuse.</summary>
    internal void Reset()
    {
        StreamInbox? inbox;
        lock (_gate)
        {
            _active = false;
            CallId = 0;
            // The source serves the next call (no allocation of a source, nor of a timer, per call) only when it
            // never fired, no Cancel is about to fire it, and its timer never fired and can no longer fire
            // (TryReset checks those two and drops the registrations left on it), as the client's deadline
            // sources and ASP.NET Core's RequestAborted do. Any other is disposed and the next call makes its own.
            if (_cancellation is { } source && (_cancelling != 0 || !source.TryReset()))
            {
                source.Dispose();
                _cancellation = null;
            }

            if (_outbox is not null)
            {
                Interlocked.Decrement(ref Connection.StreamsBeingProduced);
                _outbox = null;
            }

            inbox = _inbox;
            _inbox = null;
        }

        inbox?.Close();

        ResetMessage();
    }
}

/// <summary>Encodes an exception as (type, message, stack) for a fault message, and decodes it with bounds checks.</summary>
internal static class FaultCodec
{
    private const int MaxTypeChars = 512;
    private const int MaxMessageChars = 4096;
    private const int MaxStackChars = 16 * 1024;

    /// <summary>UTF-8 takes at most 3 bytes per UTF-16 char; three length prefixes.</summary>
    public const int MaxEncodedLength = 12 + 3 * (MaxTypeChars + MaxMessageChars + MaxStackChars);

    /// <summary>
    /// Encodes the fault. With <paramref name="full"/> false the result fits inline in a ring slot of
    /// <paramref name="slotSize"/> bytes (no stack, message cut), for when the arena has no room.
    /// </summary>
    public static int Encode(Exception exception, Span<byte> destination, int slotSize, bool full)
    {
        string type = exception.GetType().FullName ?? exception.GetType().Name;
        string message = exception.Message;
        string stack = exception.StackTrace ?? string.Empty;
        int position = 0;
        if (full)
        {
            Write(type, MaxTypeChars, destination, ref position);
            Write(message, MaxMessageChars, destination, ref position);
            Write(stack, MaxStackChars, destination, ref position);
            return position;
        }

        int budget = (slotSize - MessageHeader.Size - 12) / 3; // chars that surely fit
        int typeChars = Math.Min(type.Length, budget / 2);
        Write(type, typeChars, destination, ref position);
        Write(message, Math.Max(0, budget - typeChars), destination, ref position);
        Write(string.Empty, 0, destination, ref position);
        return position;
    }

    private static void Write(string value, int maxChars, Span<byte> destination, ref int position)
    {
        if (value.Length > maxChars)
        {
            value = value[..maxChars];
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
