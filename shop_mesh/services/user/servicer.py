"""UserService over gRPC: validate and convert via mapping, call the domain service, convert back."""

from __future__ import annotations

from typing import Any

import grpc
from shop.user.v1 import user_pb2, user_pb2_grpc

from shop_mesh.services.common.context import current_principal
from shop_mesh.services.user import mapping
from shop_mesh.services.user.domain import UserService

Context = grpc.aio.ServicerContext[Any, Any]


class UserServicer(user_pb2_grpc.UserServiceServicer):
    def __init__(self, service: UserService):
        self._service = service

    async def CreateUser(
        self, request: user_pb2.CreateUserRequest, context: Context
    ) -> user_pb2.CreateUserResponse:
        request_id, new = mapping.create_user_request(request)
        user = await self._service.create_user(request_id, new)
        return mapping.user_response(user_pb2.CreateUserResponse, user)

    async def GetUser(self, request: user_pb2.GetUserRequest, context: Context) -> user_pb2.GetUserResponse:
        user = await self._service.get_user(mapping.get_user_request(request), principal=current_principal())
        return mapping.user_response(user_pb2.GetUserResponse, user)

    async def ListUsers(
        self, request: user_pb2.ListUsersRequest, context: Context
    ) -> user_pb2.ListUsersResponse:
        query = mapping.list_users_request(request)
        page = await self._service.list_users(query.state, query.page, principal=current_principal())
        return mapping.list_users_response(page, query.filter_key)

    async def UpdateUser(
        self, request: user_pb2.UpdateUserRequest, context: Context
    ) -> user_pb2.UpdateUserResponse:
        request_id, changes = mapping.update_user_request(request)
        user = await self._service.update_user(request_id, changes, principal=current_principal())
        return mapping.user_response(user_pb2.UpdateUserResponse, user)

    async def DeleteUser(
        self, request: user_pb2.DeleteUserRequest, context: Context
    ) -> user_pb2.DeleteUserResponse:
        request_id, user_id = mapping.delete_user_request(request)
        user = await self._service.delete_user(request_id, user_id, principal=current_principal())
        return mapping.user_response(user_pb2.DeleteUserResponse, user)
