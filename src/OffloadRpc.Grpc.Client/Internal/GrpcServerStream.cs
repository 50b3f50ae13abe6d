using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Grpc.Internal;

/// <summary>
/// A streamed result over gRPC: the call starts on the first MoveNextAsync; each item is a message of
/// frames (an item head, then its buffers in chunks), valid until the next MoveNextAsync; the reply's
/// head ends the stream, a status with a fault ends it with that exception after the items before it.
/// Backpressure is HTTP/2's flow control: the server writes no faster than this side reads. A method
/// that also takes a streamed argument (duplex) sends its items while this side reads, as the server's
/// credit allows; if the caller's enumerable throws, that exception is the one the consumer gets.
/// </summary>
internal sealed class GrpcServerStream<T> : IAsyncEnumerable<T>, IAsyncEnumerator<T>
{
    private readonly GrpcInvoker _invoker;
    private readonly MethodDescriptor<T> _method;
    private readonly CancellationToken _callToken;
    private MessageBuilder? _request;
    private CancellationTokenSource? _cancel;
    private CancellationToken _enumeratorToken;
    private GrpcClientCall? _call;
    private CancellationTokenSource? _stopPump;
    private Task? _pump;
    private RpcReply _item;
    private bool _hasItem;
    private T _current = default!;
    private int _enumerated;
    private bool _finished;

    private readonly GrpcCallMetadata _metadata;

    /// <param name="metadata">The call's metadata (headers, deadline, trace context), default when none.</param>
    public GrpcServerStream(GrpcInvoker invoker, MethodDescriptor<T> method, MessageBuilder request, GrpcCallMetadata metadata, CancellationToken cancellationToken)
    {
        _invoker = invoker;
        _method = method;
        _request = request;
        _metadata = metadata;
        _callToken = cancellationToken;
    }

    public T Current => _current;

    public IAsyncEnumerator<T> GetAsyncEnumerator(CancellationToken cancellationToken = default)
    {
        if (Interlocked.Exchange(ref _enumerated, 1) != 0)
        {
            throw new InvalidOperationException($"The stream of {_method.FullName} is enumerated once: each enumeration would be another call. Call the method again instead.");
        }

        _enumeratorToken = cancellationToken;
        return this;
    }

    public async ValueTask<bool> MoveNextAsync()
    {
        ReleaseItem();
        if (_finished)
        {
            return false;
        }

        bool item;
        try
        {
            item = await ReadNextAsync().ConfigureAwait(false);
        }
        catch (Exception ex)
        {
            _finished = true;
            CancellationToken token = _cancel?.Token ?? default;
            CancellationToken caller = token.IsCancellationRequested ? token : _callToken;
            Exception translated = _call is { } call
                ? call.Translate(ex, _method, caller) // a request frame gRPC refused to send ended the call: that, not "the server went away"
                : _invoker.Translate(ex, _method, null, caller);
            await ThrowOwnFailureAsync().ConfigureAwait(false);
            throw translated;
        }

        if (!item)
        {
            _finished = true; // the reply: the stream is over
            await ThrowOwnFailureAsync().ConfigureAwait(false);
        }

        return item;
    }

    /// <summary>Starts the call on the first read; true with the next item current, false at the reply.</summary>
    private async ValueTask<bool> ReadNextAsync()
    {
        if (_call is null)
        {
            await StartAsync().ConfigureAwait(false);
        }

        var assembler = new MessageAssembler(_invoker.MaxBodyBytes, _invoker.ReplyBudget);
        try
        {
            if (await _call!.ReadMessageAsync(assembler, _cancel!.Token).ConfigureAwait(false))
            {
                if (assembler.HeadKind == FrameKind.ItemHead)
                {
                    _item = assembler.ToReply(_invoker.Connection);
                    _hasItem = true;
                    _current = _invoker.DecodeItem(_method.Decoder, _item);
                    return true;
                }

                assembler.Dispose();
                return false;
            }
        }
        catch
        {
            if (!_hasItem)
            {
                assembler.Dispose();
            }

            throw;
        }

        assembler.Dispose();
        throw new ProtocolViolationException($"The stream of {_method.FullName} ended without its reply.");
    }

    /// <summary>The stream is over: the pump of a streamed argument stops; if the caller's enumerable threw, that is thrown.</summary>
    private async ValueTask ThrowOwnFailureAsync()
    {
        if (_pump is null)
        {
            return;
        }

        _stopPump!.Cancel();
        Task pump = _pump;
        _pump = null;
        if (await ItemStream.FailureOf(pump).ConfigureAwait(false) is { } own)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(own);
        }
    }

    private async Task StartAsync()
    {
        MessageBuilder request = _request!;
        _request = null;
        _cancel = CancellationTokenSource.CreateLinkedTokenSource(_callToken, _enumeratorToken);
        if (request.HasDeferredPayloads)
        {
            try
            {
                await request.GatherAsync(_cancel.Token).ConfigureAwait(false);
            }
            catch
            {
                request.Discard();
                throw;
            }
        }

        ItemStream? items = request.TakeItemStream();
        OutgoingMessage message;
        try
        {
            message = OutgoingMessage.Create(request.WrittenBody, request.Payloads);
        }
        finally
        {
            request.Return();
        }

        try
        {
            _call = GrpcClientCall.Start(_invoker, GrpcInvoker.MethodOf(_method), message, _metadata, items is not null, _cancel.Token);
        }
        catch
        {
            message.Dispose();
            throw;
        }

        if (items is not null)
        {
            _stopPump = CancellationTokenSource.CreateLinkedTokenSource(_cancel.Token);
            _pump = items.PumpAsync(_call.Outbox!, _invoker.Options, _stopPump.Token);
        }
    }

    private void ReleaseItem()
    {
        if (_hasItem)
        {
            _hasItem = false;
            _current = default!;
            _item.Dispose();
        }
    }

    public async ValueTask DisposeAsync()
    {
        ReleaseItem();
        _request?.Discard();
        _request = null;
        if (!_finished)
        {
            _cancel?.Cancel(); // left early: the server's producer is cancelled
        }

        _finished = true;
        if (_pump is { } pump)
        {
            _pump = null;
            _stopPump!.Cancel();
            _ = await ItemStream.FailureOf(pump).ConfigureAwait(false); // left early: the consumer asked for no outcome
        }

        if (_call is { } call)
        {
            _call = null;
            await call.DisposeAsync().ConfigureAwait(false);
        }

        _stopPump?.Dispose();
        _cancel?.Dispose();
    }
}
