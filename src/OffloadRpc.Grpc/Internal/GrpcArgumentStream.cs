using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Grpc.Internal;

/// <summary>
/// A streamed argument over gRPC as the server's method sees it: the request stream's frames after the
/// request, read as the method asks for the next item. Opening it grants the client the window; moving
/// past an item gives it back in batches (credit frames on the response stream), so the client never
/// has more than the window in flight, as over shared memory. Items are taken off the request stream one
/// at a time, so one sent past the credit is refused only when it is read with none granted for it;
/// a client that floods is held back by HTTP/2 flow control on the unread stream. Ends
/// when the client completes its request stream; a fault frame (the client's enumerable threw) is
/// thrown as <see cref="RemoteInvocationException"/>; the call's cancellation as <see cref="OperationCanceledException"/>.
/// </summary>
internal sealed class GrpcArgumentStream<T> : IAsyncEnumerable<T>, IAsyncEnumerator<T>, IDisposable
{
    private readonly GrpcInboundCall _call;
    private readonly ReplyDecoder<T> _decoder;
    private readonly SerializerOptionsSource _options;
    private readonly int _creditBatch;
    private CancellationTokenSource? _cancel;
    private RpcReply _item;
    private bool _hasItem;
    private T _current = default!;
    private int _enumerated;
    private bool _finished;
    private long _granted;
    private long _received;
    private int _uncredited;
    private int _disposed; // the call ended (Dispose): an item read after is given back at once

    public GrpcArgumentStream(GrpcInboundCall call, ReplyDecoder<T> decoder, SerializerOptionsSource options)
    {
        _call = call;
        _decoder = decoder;
        _options = options;
        _creditBatch = Math.Max(1, call.Window / 4);
    }

    public T Current => _current;

    public IAsyncEnumerator<T> GetAsyncEnumerator(CancellationToken cancellationToken = default)
    {
        if (Interlocked.Exchange(ref _enumerated, 1) != 0)
        {
            throw new InvalidOperationException("A streamed argument is enumerated once.");
        }

        _cancel = CancellationTokenSource.CreateLinkedTokenSource(_call.CancellationToken, cancellationToken);
        _granted = Math.Max(1, _call.Window);
        _call.SendCredit((int)_granted);
        return this;
    }

    public async ValueTask<bool> MoveNextAsync()
    {
        ReleaseItem();
        if (_finished)
        {
            return false;
        }

        CancellationToken token = _cancel!.Token;
        var assembler = new MessageAssembler(_call.MaxBodyBytes, _call.Budget);
        try
        {
            while (await _call.Requests.MoveNext(token).ConfigureAwait(false))
            {
                Frame frame = _call.Requests.Current;
                if (frame.Kind == FrameKind.Fault)
                {
                    try
                    {
                        throw FaultCodec.Decode(frame.First.Span);
                    }
                    finally
                    {
                        frame.Release();
                    }
                }

                if (frame.Kind is FrameKind.Head or FrameKind.Credit || (frame.Kind == FrameKind.ItemHead && ++_received > _granted))
                {
                    frame.Release();
                    throw new ProtocolViolationException(frame.Kind == FrameKind.ItemHead
                        ? $"The client sent item {_received} of its streamed argument with credit for {_granted}."
                        : $"A {frame.Kind} frame in a streamed argument.");
                }

                if (assembler.Accept(frame))
                {
                    _item = assembler.ToReply(_call);
                    _hasItem = true;
                    if (Volatile.Read(ref _disposed) != 0)
                    {
                        _item.Dispose(); // the call ended while this read was pending (the method did not wait for it): nobody takes the item
                        _hasItem = false;
                        return false;
                    }

                    _current = _decoder(new CallReply(_item, _options));
                    return true;
                }
            }

            if (assembler.HeadKind == FrameKind.ItemHead)
            {
                throw new ProtocolViolationException("The client's streamed argument ended inside an item.");
            }

            assembler.Dispose();
            _finished = true;
            return false;
        }
        catch (Exception ex)
        {
            if (!_hasItem)
            {
                assembler.Dispose();
            }

            _finished = true;
            token.ThrowIfCancellationRequested();

            if (ex is ProtocolViolationException violation)
            {
                _call.AbortConnection(violation);
                throw;
            }

            if (ex is RemoteInvocationException or OperationCanceledException or ArenaExhaustedException)
            {
                throw; // an item this process had no room for: the call ends with ResourceExhausted (MethodRoute.Translate)
            }

            if (_hasItem)
            {
                var undecodable = new ProtocolViolationException("A stream item does not decode: " + ex.Message, ex);
                _call.AbortConnection(undecodable);
                throw undecodable;
            }

            throw new OperationCanceledException("The client's streamed argument broke off: " + ex.Message, ex, token);
        }
    }

    private void ReleaseItem()
    {
        if (!_hasItem)
        {
            return;
        }

        _hasItem = false;
        _current = default!;
        _item.Dispose();
        if (++_uncredited >= _creditBatch && !_finished)
        {
            _granted += _uncredited;
            _call.SendCredit(_uncredited);
            _uncredited = 0;
        }
    }

    public ValueTask DisposeAsync()
    {
        ReleaseItem();
        _finished = true;
        _cancel?.Dispose();
        return ValueTask.CompletedTask;
    }

    /// <summary>The call ended (<see cref="GrpcInboundCall.Dispose"/>): the item a method left undisposed goes back, and no credit is sent for it.</summary>
    public void Dispose()
    {
        Volatile.Write(ref _disposed, 1);
        _finished = true;
        try
        {
            _cancel?.Cancel(); // a read still pending ends
        }
        catch (ObjectDisposedException)
        {
            // DisposeAsync ran already
        }

        ReleaseItem();
        _cancel?.Dispose();
    }
}
