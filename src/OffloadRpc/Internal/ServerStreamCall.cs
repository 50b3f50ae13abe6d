using OffloadRpc.Transport;

namespace OffloadRpc.Internal;

/// <summary>
/// A streamed result as the caller sees it: an <see cref="IAsyncEnumerable{T}"/> that sends the request
/// when enumeration starts and yields each item as it arrives. An item lent in place (memory in shared
/// memory) is valid until the next <see cref="MoveNextAsync"/>; taking the next item gives the previous
/// one back and returns credit to the producer. Leaving early (or cancelling) cancels the call.
/// </summary>
internal sealed class ServerStreamCall<T> : IAsyncEnumerable<T>, IAsyncEnumerator<T>
{
    private readonly CallInvoker _invoker;
    private readonly MethodDescriptor<T> _method;
    private readonly CancellationToken _callToken;
    private readonly ClientInterceptorContext? _context;
    private DeadlineTimer _deadline;
    private MessageBuilder? _request;
    private CancellationTokenSource? _cancel;
    private CancellationToken _enumeratorToken;
    private StreamInbox? _inbox;
    private Task? _completion;
    private StreamItemMessage? _item;
    private T _current = default!;
    private int _enumerated;
    private bool _finished;

    /// <param name="context">An observed call's context: its headers, deadline and trace context go with the request, and past the deadline the stream ends with <see cref="DeadlineExceededException"/>.</param>
    public ServerStreamCall(CallInvoker invoker, MethodDescriptor<T> method, MessageBuilder request, ClientInterceptorContext? context, CancellationToken cancellationToken)
    {
        _invoker = invoker;
        _method = method;
        _request = request;
        _callToken = cancellationToken;
        _context = context;
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

    public ValueTask<bool> MoveNextAsync()
    {
        if (_item is { } previous)
        {
            _item = null;
            _current = default!;
            _inbox!.Consumed(previous);
        }

        if (_finished)
        {
            return new ValueTask<bool>(false);
        }

        if (_inbox is null)
        {
            return StartThenReadAsync();
        }

        ValueTask<StreamItemMessage?> next = _inbox.ReadAsync();
        return next.IsCompletedSuccessfully ? new ValueTask<bool>(Take(next.Result)) : ReadAsync(next);
    }

    [System.Runtime.CompilerServices.AsyncMethodBuilder(typeof(System.Runtime.CompilerServices.PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<bool> ReadAsync(ValueTask<StreamItemMessage?> next)
    {
        try
        {
            return Take(await next.ConfigureAwait(false));
        }
        catch (Exception ex) when (_context is not null && _deadline.Exceeded(_context, ex) is { } exceeded)
        {
            throw exceeded;
        }
    }

    private bool Take(StreamItemMessage? item)
    {
        if (item is null)
        {
            _finished = true;
            return false;
        }

        _item = item;
        _current = _invoker.DecodeItem(_method.Decoder, new RpcReply(item, item.Version));
        return true;
    }

    private async ValueTask<bool> StartThenReadAsync()
    {
        MessageBuilder request = _request!;
        _request = null;
        _cancel = _callToken.CanBeCanceled && _enumeratorToken.CanBeCanceled && _callToken != _enumeratorToken
            ? CancellationTokenSource.CreateLinkedTokenSource(_callToken, _enumeratorToken)
            : CancellationTokenSource.CreateLinkedTokenSource(_callToken.CanBeCanceled ? _callToken : _enumeratorToken);
        CancellationToken token = _cancel.Token;
        if (_context is not null)
        {
            try
            {
                token = _deadline.Arm(_context, request, token);
            }
            catch
            {
                _finished = true;
                throw;
            }
        }

        if (!_invoker.IsReady)
        {
            try
            {
                await _invoker.WhenReadyAsync(token).ConfigureAwait(false); // a managed connection (re)connecting
            }
            catch
            {
                request.Discard();
                _finished = true;
                throw;
            }
        }

        if (request.HasDeferredPayloads)
        {
            try
            {
                await request.GatherAsync(token).ConfigureAwait(false);
            }
            catch
            {
                request.Discard();
                _finished = true;
                throw;
            }
        }

        OutgoingMetadata metadata = _context is null ? default : OutgoingMetadata.Of(_context);
        _completion = ObserveAsync(_invoker.SendStreamingAsync(_method, request, metadata, out StreamInbox inbox, token), inbox);
        _inbox = inbox;
        return await ReadAsync(inbox.ReadAsync()).ConfigureAwait(false);
    }

    /// <summary>
    /// The reply ends the stream: a response after the last item, a remote fault after the items before
    /// it; cancellation and peer death end it at once.
    /// </summary>
    private static async Task ObserveAsync(ValueTask<RpcReply> pending, StreamInbox inbox)
    {
        try
        {
            using RpcReply reply = await pending.ConfigureAwait(false);
            inbox.Complete(null, discardQueued: false);
        }
        catch (RemoteInvocationException fault)
        {
            inbox.Complete(fault, discardQueued: false);
        }
        catch (Exception broken)
        {
            inbox.Complete(broken, discardQueued: true);
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_item is { } previous)
        {
            _item = null;
            _current = default!;
            _inbox!.Consumed(previous);
        }

        _request?.Discard();
        _request = null;
        if (_inbox is { } inbox)
        {
            _inbox = null;
            if (_completion is { IsCompleted: false } && !_finished)
            {
                // Left early: the server's producer is cancelled and whatever is in flight goes back.
                _cancel!.Cancel();
            }

            inbox.Close();
        }

        _finished = true;
        if (_completion is { } completion)
        {
            await completion.ConfigureAwait(false); // never throws; the call's entry is released by then
        }

        _cancel?.Dispose();
        _deadline.Dispose();
    }
}
